"""``vitq-loadtest``: against ``--url``, or against the real topology it starts itself.

A command of its own, apart from ``vitq``, so the benchmark's options and process handling do not
crowd the everyday verbs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from contextlib import nullcontext
from typing import Any


def cmd_loadtest(args: argparse.Namespace) -> int:
    from loadtest.drain import format_drain, run_drain
    from loadtest.load import LoadConfig, print_report, run_load, write_json
    from loadtest.topology import running_topology

    if args.url:
        from vitq.client import default_api_key

        key = args.api_key or default_api_key()
        if not key:
            print("vitq-loadtest: --url needs --api-key (or VITQ_API_KEY)", file=sys.stderr)
            return 2
        context: Any = nullcontext(None)
    else:
        database_url = args.database_url or os.environ.get("VITQ_DATABASE_URL")
        broker_url = args.broker_url or os.environ.get("VITQ_BROKER_URL")
        if not database_url or not broker_url:
            print(
                "vitq-loadtest: give --url (a running service) or --database-url and --broker-url "
                "(PostgreSQL and Redis; or VITQ_DATABASE_URL / VITQ_BROKER_URL) to start the topology",
                file=sys.stderr,
            )
            return 2
        context = running_topology(
            database_url=database_url,
            broker_url=broker_url,
            api_workers=args.api_workers,
            workers=args.workers,
        )
    with context as topo:
        url, key = (topo.url, topo.api_key) if topo is not None else (args.url, key)
        if topo is not None:
            print(f"started {url}: {args.api_workers} API process(es), {args.workers} worker(s), "
                  f"queue {topo.queue}, logs in {topo.data_dir}", file=sys.stderr)
        if args.drain_jobs:
            report = run_drain(url, key, jobs=args.drain_jobs, timeout_s=args.drain_timeout, workers=args.workers)
            print(format_drain(report))
            if args.json:
                write_json(args.json, report)
                print(f"wrote {args.json}")
            return 0 if report["ok"] else 1
        config = LoadConfig(
            clients=args.clients,
            duration_s=args.duration,
            submit_fraction=args.submit_fraction,
            keys=args.keys,
            think_s=args.think,
            ramp_up_s=args.ramp_up,
        )
        report = _run_async(run_load(url, key, config))
        report["topology"] = (
            {"api_workers": args.api_workers, "workers": args.workers} if topo is not None else "external"
        )
        return print_report(report, args.json)


def _run_async(coro: Any) -> Any:
    """uvloop when available: the generator's own overhead is part of what it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitq-loadtest",
        description="Load benchmark: concurrent idempotent submits + polling, or draining a queue of jobs. "
        "Without --url, starts `vitq api` and `vitq worker` over --database-url/--broker-url.",
    )
    p.add_argument("--url", help="a running service (default: start the topology)")
    p.add_argument("--api-key", help="key for --url (default $VITQ_API_KEY)")
    p.add_argument("--database-url", help="PostgreSQL URL for the started topology (default $VITQ_DATABASE_URL)")
    p.add_argument("--broker-url", help="Redis URL for the started topology (default $VITQ_BROKER_URL)")
    p.add_argument("--api-workers", type=int, default=2, help="uvicorn processes of the started API")
    p.add_argument("--workers", type=int, default=1, help="Celery worker processes of the started topology")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=60.0, help="seconds")
    p.add_argument("--think", type=float, default=1.0, help="mean seconds a client waits between requests")
    p.add_argument("--ramp-up", type=float, default=0.0,
                   help="start the clients evenly over this many seconds (default 0: all at once)")
    p.add_argument("--submit-fraction", type=float, default=0.1, help="share of requests that are submits")
    p.add_argument("--keys", type=int, default=20, help="distinct Idempotency-Keys (the rest are repeats)")
    p.add_argument("--drain-jobs", type=int, default=0, help="instead: queue this many jobs and time the drain")
    p.add_argument("--drain-timeout", type=float, default=1800.0, help="give up watching the drain after (s)")
    p.add_argument("--json", help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    return cmd_loadtest(build_parser().parse_args(argv))
