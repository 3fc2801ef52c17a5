"""The worker's PyTorch thread budget: each job gets its share of the usable CPUs, never all of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.cpu_threads import threads_per_job, usable_cpus


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_a_cgroup_quota_caps_the_usable_cpus_below_the_affinity_mask(tmp_path: Path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one thread
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == _affinity()
    cpu_max.write_text(f"{(_affinity() + 8) * 100000} 100000\n")  # a quota above the mask does not add CPUs
    assert usable_cpus(cpu_max) == _affinity()


def test_a_missing_or_unreadable_cgroup_file_falls_back_to_the_affinity_mask(tmp_path: Path):
    assert usable_cpus(tmp_path / "absent") == _affinity()
    (tmp_path / "garbage").write_text("not numbers")
    assert usable_cpus(tmp_path / "garbage") == _affinity()


@pytest.mark.parametrize(
    ("configured", "concurrency", "cpus", "expected"),
    [(None, 1, 16, 16), (None, 4, 16, 4), (None, 3, 2, 1), (None, 0, 2, 2), (3, 4, 16, 3)],
)
def test_each_pool_child_gets_an_equal_share_unless_configured(configured, concurrency, cpus, expected):
    assert threads_per_job(configured, concurrency, cpus) == expected


def test_the_setting_refuses_zero_threads(monkeypatch):
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("VITQ_TORCH_THREADS", "0")
    with pytest.raises(ValidationError, match="torch_threads"):
        Settings()
