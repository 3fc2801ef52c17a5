"""Celery worker: two tasks, ``vitq.run_job(job_id)`` (run core on a job) and
``vitq.deliver_webhook(job_id)`` (tell the tenant it ended). The job row in the database is the
truth; Celery carries only ids, and every change of the row goes through ``service.lifecycle``.
"""
