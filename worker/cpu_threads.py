"""How many PyTorch threads one job gets, so that jobs running side by side never oversubscribe the CPU.

Why: PyTorch sizes its intra-op pool to every core it sees, and its OpenMP threads spin while they
wait. Two worker processes with two threads each on a two-core host made a trivial job 20× slower
(calibration 0.19 s → 12 s), measured with `vitq loadtest --drain-jobs`. Each job must get its share of
the CPUs this process may use (affinity and cgroup quota both count), not all of them.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("vitq.worker")

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 quota (a container's --cpus)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity mask is the limit
    return max(1, cpus)


def threads_per_job(configured: int | None, concurrency: int, cpus: int | None = None) -> int:
    """``configured`` when set (``VITQ_TORCH_THREADS``), else an equal share of the usable CPUs per pool child."""
    if configured is not None:
        return configured
    return max(1, (cpus if cpus is not None else usable_cpus()) // max(1, concurrency))


def apply_thread_budget(threads: int) -> None:
    """Size this process's PyTorch pools; called in each pool child before its first job."""
    import torch

    torch.set_num_threads(threads)
    log.info("PyTorch uses %d thread(s) per job in this process", threads)
