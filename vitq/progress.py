"""Progress a person can read: one live bar on a terminal, a few plain lines otherwise.

Both views take the same record, the ``progress`` of ``GET /v1/jobs/{id}`` (``stage``, ``unit``,
``index``, ``total``, ``done``, ``total_steps``, ``percent``, ``eta_seconds``). ``vitq quantize``
builds that record from core's events (:class:`ProgressBar`); ``vitq jobs submit --wait``, ``vitq
jobs wait`` and ``make demo`` take it from the API (:class:`JobProgress`). The ETA is shown only once
it means something (``service.progress.EtaEstimator``: not after the first step).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

from service.progress import EtaEstimator, percent

PLAIN_EVERY_PERCENT = 10
"""Without a terminal, a line when the stage or unit changes and at every 10 % within one."""


def _where(status: str, p: dict[str, Any]) -> str:
    """``running · stage1 · blocks.3 4/12``: what the job is doing, without the numbers that tick."""
    parts = [status]
    if p.get("stage"):
        parts.append(str(p["stage"]))
    if p.get("unit"):
        index, total = p.get("index"), p.get("total")
        counter = f" {index + 1}/{total}" if isinstance(index, int) and total else ""
        parts.append(f"{p['unit']}{counter}")
    return " · ".join(parts)


def _eta(seconds: Any) -> str:
    return f"eta {tqdm.format_interval(seconds)}" if isinstance(seconds, int | float) else ""


def progress_line(status: str, p: dict[str, Any] | None) -> str:
    """One plain line: ``running · stage1 · blocks.3 4/12 · 35% · eta 02:10``."""
    p = p or {}
    parts = [_where(status, p)]
    if p.get("percent") is not None:
        parts.append(f"{p['percent']:.0f}%")
    if eta := _eta(p.get("eta_seconds")):
        parts.append(eta)
    return " · ".join(parts)


class ProgressView:
    """A tqdm bar redrawn in place when ``stream`` is a terminal; plain lines when it is not
    (a log, a pipe, CI), printed only when the stage or unit changes or another 10 % is done."""

    def __init__(self, label: str, *, stream: TextIO | None = None, live: bool | None = None,
                 disable: bool = False) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.disable = disable
        self._bar: tqdm | None = None
        self._last: tuple[str, int] | None = None

    def update(self, status: str, p: dict[str, Any] | None) -> None:
        if self.disable:
            return
        p = p or {}
        if self.live:
            self._draw(status, p)
        else:
            self._print(status, p)

    def _draw(self, status: str, p: dict[str, Any]) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=1,
                file=self.stream,
                dynamic_ncols=True,
                bar_format="{desc} |{bar}| {percentage:3.0f}% {postfix}",
                leave=True,
            )
        bar = self._bar
        total, done = p.get("total_steps") or 0, p.get("done") or 0
        if total:
            bar.total, bar.n = total, min(done, total)
        elif status == "succeeded":
            bar.total, bar.n = 1, 1
        bar.set_description_str(f"{self.label} {_where(status, p)}", refresh=False)
        postfix = _eta(p.get("eta_seconds"))
        if p.get("loss") is not None:
            postfix = f"loss {p['loss']:.4g} {postfix}".strip()
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def _print(self, status: str, p: dict[str, Any]) -> None:
        pct = p.get("percent")
        key = (_where(status, p), int(pct // PLAIN_EVERY_PERCENT) if isinstance(pct, int | float) else -1)
        if key == self._last:
            return
        self._last = key
        print(f"[{self.label}] {progress_line(status, p)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class JobProgress:
    """``on_progress`` for ``Client.wait``: shows a job's status and progress as the API reports them."""

    def __init__(self, job_id: str, **view: Any) -> None:
        self.view = ProgressView(job_id, **view)

    def __call__(self, job: dict[str, Any]) -> None:
        self.view.update(job["status"], job.get("progress"))

    def close(self) -> None:
        self.view.close()

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressBar:
    """``progress`` callback for ``core.run_quantization``: core's events (``stage``, ``unit``,
    ``done``, ``total_steps``, ``loss``) drawn like a job's progress, with the same ETA rule."""

    def __init__(self, desc: str = "quantize", disable: bool = False, **view: Any) -> None:
        self.view = ProgressView(desc, disable=disable, **view)
        self._eta = EtaEstimator()

    def __call__(self, event: dict[str, Any]) -> None:
        done, total = event.get("done") or 0, event.get("total_steps") or 0
        record = {**event, "percent": percent(done, total), "eta_seconds": self._eta.update(done, total)}
        self.view.update("running", record)

    def close(self) -> None:
        self.view.close()
