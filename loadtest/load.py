"""`vitq-loadtest`: concurrent clients mixing idempotent job submissions and status polling.

Why it exists: the service promises that retried submissions never create a second job and that
polling stays fast while many clients wait on their jobs. This command measures both against a
running service (``--url``) or the real topology it starts itself (uvicorn + Celery workers over
PostgreSQL and Redis), prints latency per endpoint, writes JSON, and exits non-zero when a 5xx,
a transport error or a duplicated job shows up.

Each client is a loop: submit a smoke job under an ``Idempotency-Key`` drawn from a small set
(so most submissions are repeats), or poll one of the jobs it holds, then wait ``think`` seconds
(jittered, as a client honouring ``Retry-After`` would). ``--think 0`` saturates the server.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.connection import Connection, LoadHttpError
from loadtest.server_latency import scrape_buckets, server_side

GOALS_MS = {"poll": 50.0, "submit": 150.0}
SMOKE_JOB: dict[str, Any] = {
    "model": "fmnist-vit-tiny",
    "w_bits": 4,
    "a_bits": 4,
    "method": "ptq-uniform",
    "preset": "smoke",
    "calibration": "fashion-mnist:train:8",
    "options": {"iters": 0, "calib_size": 8, "batch_size": 8},
}


@dataclass
class LoadConfig:
    clients: int = 200
    duration_s: float = 60.0
    submit_fraction: float = 0.1
    keys: int = 20
    think_s: float = 1.0
    timeout_s: float = 30.0
    ramp_up_s: float = 0.0
    """Clients start evenly over this many seconds (locust's spawn rate); 0 starts all of them at once."""


@dataclass
class Recorder:
    """Latencies (seconds) and statuses per endpoint, plus the job ids each idempotency key got."""

    latencies: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    """Per endpoint: (seconds since the run started, latency in seconds)."""
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    ids_by_key: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    transport_errors: Counter = field(default_factory=Counter)

    def add(self, endpoint: str, status: int, at: float, seconds: float) -> None:
        self.latencies[endpoint].append((at, seconds))
        self.statuses[endpoint][status] += 1


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no samples."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


async def _client(i: int, url: str, headers: dict[str, str], cfg: LoadConfig, prefix: str, rec: Recorder,
                  t0: float) -> None:
    rng = random.Random(i)
    mine: list[str] = []
    end = t0 + cfg.duration_s
    conn = Connection(url, headers, cfg.timeout_s)
    # Client i starts at its slot of the ramp, then within one think time (spreads the first submits).
    await asyncio.sleep(cfg.ramp_up_s * i / max(1, cfg.clients) + (rng.uniform(0, cfg.think_s) if cfg.think_s else 0))
    try:
        while time.monotonic() < end:
            submit = not mine or rng.random() < cfg.submit_fraction
            key = f"{prefix}-{rng.randrange(cfg.keys)}"
            start = time.perf_counter()
            try:
                if submit:
                    reply = await conn.request("POST", "/v1/jobs", SMOKE_JOB, {"Idempotency-Key": key})
                else:
                    reply = await conn.request("GET", f"/v1/jobs/{rng.choice(mine)}")
            except LoadHttpError as exc:
                rec.transport_errors[str(exc).split(":")[0]] += 1
                await asyncio.sleep(0.1)
                continue
            elapsed = time.perf_counter() - start
            rec.add("submit" if submit else "poll", reply.status, time.monotonic() - t0 - elapsed, elapsed)
            if submit and reply.status == 202:
                job_id = reply.json()["id"]
                rec.ids_by_key[key].add(job_id)
                if job_id not in mine:
                    mine.append(job_id)
            if cfg.think_s:
                await asyncio.sleep(cfg.think_s * rng.uniform(0.5, 1.5))
    finally:
        await conn.close()


async def _jobs_since(http: httpx.AsyncClient, marker: str) -> list[str]:
    """The tenant's job ids created after ``marker`` (ids sort by creation time), newest first."""
    ids: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 200}
        if cursor:
            params["cursor"] = cursor
        response = await http.get("/v1/jobs", params=params)
        response.raise_for_status()
        body = response.json()
        page = [j["id"] for j in body["data"]]
        ids.extend(i for i in page if i > marker)
        cursor = body.get("next_cursor")
        if not cursor or (page and page[-1] <= marker):
            return ids


async def run_load(url: str, api_key: str, cfg: LoadConfig) -> dict[str, Any]:
    """Run the mixed load; return the report (stats, checks, ``ok``)."""
    prefix = f"load-{secrets.token_hex(4)}"
    marker = f"job_{int(time.time() * 1000) - 1:012x}"
    rec = Recorder()
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=cfg.timeout_s) as http:
        try:
            before = scrape_buckets(None, url)
        except httpx.HTTPError:
            before = {}
        started = time.monotonic()
        clients = asyncio.gather(*(_client(i, url, headers, cfg, prefix, rec, started) for i in range(cfg.clients)))
        try:  # a client is at most one request timeout late
            await asyncio.wait_for(clients, cfg.duration_s + cfg.timeout_s + 10)
        except TimeoutError:
            rec.transport_errors["run did not end in time"] += 1
        wall = time.monotonic() - started
        try:
            after = scrape_buckets(None, url)
        except httpx.HTTPError:
            after = before
        created = await _jobs_since(http, marker)
    report = build_report(cfg, rec, wall, created, url)
    for name, values in server_side(before, after).items():
        report["endpoints"][name]["server"] = values
    return report


def build_report(cfg: LoadConfig, rec: Recorder, wall: float, created: list[str], url: str) -> dict[str, Any]:
    endpoints: dict[str, Any] = {}
    warmup = max(cfg.ramp_up_s, min(5.0, cfg.duration_s / 4))
    for name in ("submit", "poll"):
        samples = rec.latencies.get(name, [])
        values = [s for _, s in samples]
        steady = [s for at, s in samples if at >= warmup]
        statuses = rec.statuses.get(name, Counter())
        endpoints[name] = {
            "requests": len(values),
            "rps": len(values) / wall if wall else 0.0,
            "p50_ms": 1000 * percentile(values, 50),
            "p90_ms": 1000 * percentile(values, 90),
            "p99_ms": 1000 * percentile(values, 99),
            "max_ms": 1000 * max(values, default=0.0),
            "steady_p99_ms": 1000 * percentile(steady, 99),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "goal_p99_ms": GOALS_MS[name],
        }
    duplicated = {k: sorted(v) for k, v in rec.ids_by_key.items() if len(v) != 1}
    returned = set().union(*rec.ids_by_key.values()) if rec.ids_by_key else set()
    server_5xx = sum(n for e in endpoints.values() for s, n in e["statuses"].items() if int(s) >= 500)
    other_errors = sum(n for e in endpoints.values() for s, n in e["statuses"].items() if 400 <= int(s) < 500)
    checks = {
        "keys_used": len(rec.ids_by_key),
        "jobs_created": len(created),
        "one_job_per_key": not duplicated and set(created) == returned,
        "keys_with_several_jobs": duplicated,
        "jobs_not_returned_to_any_key": sorted(set(created) - returned),
        "server_errors_5xx": server_5xx,
        "client_errors_4xx": other_errors,
        "transport_errors": dict(rec.transport_errors),
        "latency_goals_met": all(e["p99_ms"] < e["goal_p99_ms"] for e in endpoints.values() if e["requests"]),
    }
    ok = checks["one_job_per_key"] and server_5xx == 0 and other_errors == 0 and not rec.transport_errors
    return {"url": url, "config": asdict(cfg), "wall_s": wall, "endpoints": endpoints, "checks": checks, "ok": ok}


def format_table(report: dict[str, Any]) -> str:
    lines = [
        "| endpoint | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | p99 after warm-up | p99 goal | statuses |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    labels = {"submit": "POST /v1/jobs", "poll": "GET /v1/jobs/{id}"}
    for name, e in report["endpoints"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in e["statuses"].items()) or "-"
        lines.append(
            f"| {labels.get(name, name)} | {e['requests']} | {e['rps']:.0f} | {e['p50_ms']:.1f} | "
            f"{e['p90_ms']:.1f} | {e['p99_ms']:.1f} | {e['max_ms']:.1f} | {e['steady_p99_ms']:.1f} | "
            f"< {e['goal_p99_ms']:.0f} | {statuses} |"
        )
    for name, e in report["endpoints"].items():
        server = e.get("server") or {}
        if server.get("p99_ms_at_most") is not None:
            lines.append(
                f"server-side {labels.get(name, name)} (its /metrics histogram): "
                f"p50 <= {server['p50_ms_at_most']:g} ms, "
                f"p99 <= {server['p99_ms_at_most']:g} ms"
            )
    c = report["checks"]
    lines += [
        "",
        f"idempotency keys used {c['keys_used']}, jobs created {c['jobs_created']}: "
        f"{'one job per key' if c['one_job_per_key'] else 'DUPLICATES ' + json.dumps(c['keys_with_several_jobs'])}",
        f"5xx {c['server_errors_5xx']}, 4xx {c['client_errors_4xx']}, transport errors {c['transport_errors'] or 0}; "
        f"latency goals {'met' if c['latency_goals_met'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def print_report(report: dict[str, Any], json_path: str | None) -> int:
    print(format_table(report))
    if json_path:
        write_json(json_path, report)
        print(f"wrote {json_path}")
    if not report["ok"]:
        print("vitq-loadtest: FAILED (errors or duplicated jobs; see above)", file=sys.stderr)
    return 0 if report["ok"] else 1
