"""`vitq-loadtest` at tiny scale against the real topology (uvicorn + PostgreSQL + Redis), so the
benchmark command cannot rot: both modes run, report, and pass their own checks."""

from __future__ import annotations

import json
import sys

from loadtest.load import LoadConfig, build_report, percentile


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile([], 99) == 0.0


def test_report_fails_on_duplicated_jobs_and_server_errors():
    from loadtest.load import Recorder

    rec = Recorder()
    rec.add("submit", 202, 0.0, 0.01)
    rec.add("poll", 500, 0.0, 0.01)
    rec.ids_by_key["k"] |= {"job_1", "job_2"}
    report = build_report(LoadConfig(clients=1, duration_s=1), rec, 1.0, ["job_1", "job_2"], "http://x")
    assert not report["ok"]
    assert report["checks"]["keys_with_several_jobs"] == {"k": ["job_1", "job_2"]}
    assert report["checks"]["server_errors_5xx"] == 1


def test_steady_state_latency_starts_after_the_ramp_up():
    from loadtest.load import Recorder

    rec = Recorder()
    rec.add("submit", 202, 3.0, 0.9)  # during the 10 s ramp
    rec.add("submit", 202, 12.0, 0.02)
    rec.ids_by_key["k"].add("job_1")
    report = build_report(LoadConfig(clients=2, duration_s=60, ramp_up_s=10), rec, 60.0, ["job_1"], "http://x")
    submit = report["endpoints"]["submit"]
    assert submit["p99_ms"] == 900.0 and submit["steady_p99_ms"] == 20.0
    assert report["config"]["ramp_up_s"] == 10 and report["ok"]


def loadtest_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loadtest", *args]


def test_loadtest_command_runs_both_modes_on_the_real_topology(migrated_pg, redis_url, tmp_path):
    import subprocess

    common = ["--database-url", migrated_pg, "--broker-url", redis_url, "--api-workers", "2"]
    mixed = subprocess.run(
        loadtest_command(*common, "--workers", "0", "--clients", "5", "--duration", "3",
                     "--think", "0.2", "--keys", "3", "--ramp-up", "1", "--json", str(tmp_path / "mixed.json")),
        capture_output=True, text=True, timeout=180,
    )
    assert mixed.returncode == 0, mixed.stdout + mixed.stderr
    report = json.loads((tmp_path / "mixed.json").read_text())
    assert report["ok"] and report["checks"]["one_job_per_key"] and report["config"]["ramp_up_s"] == 1
    assert report["endpoints"]["poll"]["requests"] > 0 and "GET /v1/jobs/{id}" in mixed.stdout
    drain = subprocess.run(
        loadtest_command(*common, "--workers", "1", "--drain-jobs", "2", "--drain-timeout", "150",
                     "--json", str(tmp_path / "drain.json")),
        capture_output=True, text=True, timeout=240,
    )
    assert drain.returncode == 0, drain.stdout + drain.stderr
    result = json.loads((tmp_path / "drain.json").read_text())
    assert result["all_drained"] and result["in_order"] and result["statuses"] == {"succeeded": 2}
    assert result["metrics_seen"]["duration_histogram"] and result["metrics_seen"]["queue_wait_histogram"]
