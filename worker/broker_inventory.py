"""Which jobs the broker still holds a message for, so the reaper can send again what it lost.

Why: the job row is the truth, the broker only carries ids. A Redis restart without persistence (or a
flush, or an eviction) drops queued messages; those jobs would stay ``queued`` for ever. Reading the
queue lists and kombu's ``unacked`` hash tells exactly which ``queued`` rows have no message left, so
only those are re-enqueued (no flood of duplicates behind a long queue).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

from service.queue import RUN_JOB
from service.settings import Settings

PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's Redis transport keeps one list per priority step: ``queue`` and ``queue\\x06\\x16<p>``."""
UNACKED_KEY = "unacked"


def pending_job_ids(settings: Settings) -> set[str] | None:
    """Job ids with a ``run_job`` message in the broker (queued or delivered and not yet acked).

    ``None`` when the broker cannot be inspected (the filesystem broker keeps its messages on disk and
    does not lose them on restart); raises when Redis is unreachable, so the caller skips the pass.
    """
    url = settings.resolved_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        raw: list[bytes] = []
        for step in PRIORITY_STEPS:
            key = settings.queue if step == 0 else f"{settings.queue}{PRIORITY_SEP}{step}"
            raw.extend(client.lrange(key, 0, -1))
        unacked = client.hvals(UNACKED_KEY)
    finally:
        client.close()
    ids = set(_job_ids(raw))
    for entry in unacked:
        try:
            message = json.loads(entry)[0]
        except (ValueError, IndexError, TypeError):
            continue
        ids.update(_job_ids([json.dumps(message).encode()]))
    return ids


def _job_ids(messages: Iterable[bytes]) -> Iterable[str]:
    for payload in messages:
        try:
            message = json.loads(payload)
            if message.get("headers", {}).get("task") != RUN_JOB:
                continue
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            if args and isinstance(args[0], str):
                yield args[0]
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not one of ours, or not JSON: ignore
