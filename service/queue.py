"""The queue contract: the task names, the Celery application built from settings, and the send
functions. Importing this module imports no task code (no torch), so the API sends tasks by name
with it; the worker builds its app here with ``include_tasks=True``.

Jobs and webhooks have queues of their own: ``VITQ_QUEUE`` for ``vitq.run_job`` (consumed by the GPU
workers, one job at a time) and ``VITQ_WEBHOOK_QUEUE`` (default ``<queue>-webhooks``) for
``vitq.deliver_webhook``, consumed by ``vitq webhooks`` (a thread pool, no torch). A webhook never waits
behind a quantization job: a worker running a 6-hour job does not hold the deliveries of other jobs.
"""

from __future__ import annotations

from celery import Celery

from service.settings import Settings

RUN_JOB = "vitq.run_job"
DELIVER_WEBHOOK = "vitq.deliver_webhook"


JOB_TASKS = "worker.tasks"
WEBHOOK_TASKS = "worker.webhook_tasks"


def make_celery(settings: Settings, *, include_tasks: bool = False, webhooks: bool = False) -> Celery:
    """The app; ``include_tasks`` registers the job task (imports torch), ``webhooks`` the delivery task."""
    include = ([JOB_TASKS] if include_tasks else []) + ([WEBHOOK_TASKS] if webhooks else [])
    app = Celery("vitq", broker=settings.resolved_broker_url, include=include)
    transport_options: dict = {}
    if settings.is_filesystem_broker:
        folder = settings.broker_folder
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.5,
        }
    elif settings.resolved_broker_url.startswith(("redis://", "rediss://")):
        # Longer than any job: an unacked message is redelivered only after the worker is gone.
        transport_options = {"visibility_timeout": settings.job_time_limit_s + 600}
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        # The API answers 503 quickly when the broker is down rather than hanging the request.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        task_default_queue=settings.queue,
        task_routes={
            RUN_JOB: {"queue": settings.queue},
            DELIVER_WEBHOOK: {"queue": settings.resolved_webhook_queue},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


_apps: dict[str, Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """A cached client app per broker/queue (the API only sends)."""
    key = f"{settings.resolved_broker_url}|{settings.queue}|{settings.resolved_webhook_queue}|{settings.broker_folder}"
    if key not in _apps:
        _apps[key] = make_celery(settings)
    return _apps[key]


def send_run_job(settings: Settings, job_id: str) -> None:
    celery_for(settings).send_task(RUN_JOB, args=[job_id], queue=settings.queue)


def send_webhook(settings: Settings, job_id: str) -> None:
    """Queue a delivery on the webhook queue (never the job queue)."""
    celery_for(settings).send_task(DELIVER_WEBHOOK, args=[job_id], queue=settings.resolved_webhook_queue)
