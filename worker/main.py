"""Starting a worker process: Celery with prefetch 1 and a reaper thread for stale jobs.

Run one process per GPU (set ``CUDA_VISIBLE_DEVICES``). The main process never touches CUDA; the
task runs in Celery's pool child, which creates its own CUDA context.
"""

from __future__ import annotations

import logging
import os
import socket

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from service.db import dispose_all
from service.queue import make_celery, send_run_job
from service.settings import Settings
from worker.cpu_threads import apply_thread_budget, threads_per_job
from worker.reaper import Reaper

log = logging.getLogger("vitq.worker")


def run_worker(settings: Settings, *, concurrency: int = 1, loglevel: str = "INFO") -> int:
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_celery(settings, include_tasks=True)
    reaper = Reaper(settings, lambda job_id: send_run_job(settings, job_id))
    threads = threads_per_job(settings.torch_threads, concurrency)

    @worker_ready.connect(weak=False)
    def _start_reaper(**_: object) -> None:
        reaper.start()

    @worker_shutdown.connect(weak=False)
    def _stop_reaper(**_: object) -> None:
        reaper.stop()

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
