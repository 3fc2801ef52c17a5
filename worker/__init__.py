"""Celery worker: one task, ``vitq.run_job(job_id)``; the job row in the database is the truth."""
