"""Give a finished job's memory back, so one worker process can run job after job (including after a
time limit or a crash) without growing.

Why this is needed: a job's model, cached unit inputs and traceback frames are freed by reference
counting only once nothing points at them; cycles wait for the collector, CUDA's caching allocator
keeps freed blocks for the process, and glibc keeps freed heap pages mapped. Each is handed back here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

log = logging.getLogger("vitq.worker")


def release_memory() -> None:
    """Collect cycles, empty the CUDA cache (only if CUDA was used), return free heap to the OS."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        log.debug("malloc_trim unavailable")
