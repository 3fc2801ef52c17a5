"""Starting a worker process: Celery with prefetch 1, a reaper thread for stale jobs and a retention
thread; and the webhook delivery process (``vitq webhooks``), which consumes only the webhook queue.

Run one process per GPU (set ``CUDA_VISIBLE_DEVICES``). The main process never touches CUDA; the
task runs in Celery's pool child, which creates its own CUDA context.
"""

from __future__ import annotations

import logging
import os
import socket

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from service.db import dispose_all
from service.offline import go_offline
from service.queue import make_celery, send_run_job, send_webhook
from service.settings import Settings
from worker.cpu_threads import apply_thread_budget, threads_per_job
from worker.reaper import reaper
from worker.retention import retention

log = logging.getLogger("vitq.worker")


def run_worker(settings: Settings, *, concurrency: int = 1, loglevel: str = "INFO") -> int:
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    go_offline()  # the service downloads no weights (service/offline.py)
    # The delivery task is registered too (not consumed: the job queue only), so a webhook message left
    # on the job queue by an older version is still delivered.
    app = make_celery(settings, include_tasks=True, webhooks=True)
    reaper_pass = reaper(
        settings, lambda job_id: send_run_job(settings, job_id), lambda job_id: send_webhook(settings, job_id)
    )
    retention_pass = retention(settings)
    threads = threads_per_job(settings.torch_threads, concurrency)

    @worker_ready.connect(weak=False)
    def _start_reaper(**_: object) -> None:
        reaper_pass.start()
        retention_pass.start()

    @worker_shutdown.connect(weak=False)
    def _stop_reaper(**_: object) -> None:
        reaper_pass.stop()
        retention_pass.stop()

    @worker_process_init.connect(weak=False)
    def _fresh_connections(**_: object) -> None:
        dispose_all()  # never share pooled database connections across fork
        apply_thread_budget(threads)

    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    hostname = f"vitq-{'gpu' + gpu.replace(',', '-') if gpu else 'cpu'}-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        "--prefetch-multiplier=1",
        "-Q",
        settings.queue,
        f"--hostname={hostname}",
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv=argv)
    return 0


def run_webhook_worker(settings: Settings, *, concurrency: int | None = None, loglevel: str = "INFO") -> int:
    """``vitq webhooks``: deliver webhooks from their own queue, in a thread pool, beside (never behind)
    the quantization jobs. Imports no torch; run one or more anywhere that reaches the database."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_celery(settings, webhooks=True)
    hostname = f"vitq-webhooks-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--concurrency={concurrency or settings.webhook_concurrency}",
        "--pool=threads",
        "-Q",
        settings.resolved_webhook_queue,
        f"--hostname={hostname}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv=argv)
    return 0
