"""vitq/progress.py: one live bar on a terminal, a few plain lines otherwise, no ETA before it means something."""

from __future__ import annotations

import io

from vitq.progress import JobProgress, ProgressBar, ProgressView, progress_line


def _poll(status: str, **progress) -> dict:
    return {"status": status, "progress": progress or None}


def test_plain_lines_only_when_something_a_person_reads_changes():
    """The demo printed "running · evaluate_fp" 13 times, one per poll; now a line comes only when the
    stage or unit changes, or another 10 % is done."""
    out = io.StringIO()
    show = JobProgress("job_1", stream=out, live=False)
    show(_poll("queued"))
    for _ in range(13):
        show(_poll("running", stage="evaluate_fp"))
    for done in (1, 2, 3, 15, 16, 35):
        show(_poll("running", stage="stage1", unit="blocks.0", index=0, total=12, done=done, total_steps=100,
                   percent=float(done), eta_seconds=None if done < 15 else 100.0 - done))
    show(_poll("succeeded", stage="stage1", percent=100.0, eta_seconds=0.0))
    lines = out.getvalue().splitlines()
    assert lines == [
        "[job_1] queued",
        "[job_1] running · evaluate_fp",
        "[job_1] running · stage1 · blocks.0 1/12 · 1%",
        "[job_1] running · stage1 · blocks.0 1/12 · 15% · eta 01:25",
        "[job_1] running · stage1 · blocks.0 1/12 · 35% · eta 01:05",
        "[job_1] succeeded · stage1 · 100% · eta 00:00",
    ]


def test_live_view_redraws_one_bar_in_place():
    out = io.StringIO()
    view = ProgressView("job_1", stream=out, live=True)
    for done in range(1, 40):
        view.update("running", {"stage": "stage1", "unit": "blocks.0", "index": 0, "total": 12, "done": done,
                                "total_steps": 100, "percent": float(done), "eta_seconds": None})
    view.close()
    text = out.getvalue()
    assert text.count("\n") == 1  # one bar, left on screen when it closes
    assert "\r" in text and "stage1" in text and "39%" in text.splitlines()[-1].split("\r")[-1]
    assert "eta" not in text  # no ETA was reported


def test_quantize_bar_gives_no_eta_on_its_first_steps():
    out = io.StringIO()
    bar = ProgressBar("quantize", stream=out, live=False)
    bar({"stage": "stage1", "unit": "blocks.0", "index": 0, "total": 12, "done": 1, "total_steps": 4800})
    bar.close()
    assert out.getvalue().strip() == "[quantize] running · stage1 · blocks.0 1/12 · 0%"
    assert "eta" not in progress_line("running", {"stage": "x", "eta_seconds": None})
