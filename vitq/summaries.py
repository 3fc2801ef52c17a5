"""Human summaries of what the CLI prints: a finished job in a few lines instead of its JSON, job and
dataset lists as tables, and top-1 printed the same way everywhere (``84.47 %``, drops in points).

Scripts get JSON instead (``--json``, or any stdout that is not a terminal): see ``wants_json``.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any


def wants_json(args: Any) -> bool:
    """``--json`` asks for JSON; so does a stdout that is not a terminal (a pipe, a file, ``$(…)``), so a
    script written against the JSON output keeps working. ``--human`` forces the summary."""
    if getattr(args, "json", False):
        return True
    if getattr(args, "human", False):
        return False
    return not sys.stdout.isatty()


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def pct(value: Any) -> str:
    """A fraction as a percentage, the one format of every top-1 the CLI prints: ``84.47 %``."""
    return f"{100 * value:.2f} %" if isinstance(value, int | float) else "n/a"


def points(value: Any) -> str:
    """A top-1 drop (a fraction) in percentage points, signed: ``-0.43 points``."""
    return f"{-100 * value:+.2f} points" if isinstance(value, int | float) else "n/a"


def megabytes(n: Any) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, int | float) else "n/a"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "n/a"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


def _time(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def model_name(model: Any) -> str:
    if isinstance(model, dict):
        return str(model.get("timm_name") or model)
    return str(model)


def bits_of(job: dict[str, Any]) -> str:
    result = job.get("result") or {}
    if result.get("chosen"):
        return str(result["chosen"])
    if job.get("w_bits") is not None:
        return f"W{job['w_bits']}A{job['a_bits']}"
    target = job.get("target") or {}
    if target.get("max_top1_drop") is not None:
        return f"target drop <= {100 * target['max_top1_drop']:.2f} points"
    return "?"


def job_summary(job: dict[str, Any], report: dict[str, Any] | None = None) -> str:
    """A job in a few lines: its outcome, what ran (with the calibration size it really used), the
    accuracy, sizes, which model was kept, and the next command. ``report`` is its report.json, when
    fetched, for the facts the job body does not carry."""
    jid, status = job["id"], job["status"]
    started, finished = _time(job.get("started_at")), _time(job.get("finished_at"))
    took = f" in {duration((finished - started).total_seconds())}" if started and finished else ""
    attempts = f", attempt {job['attempts']}" if job.get("attempts", 1) > 1 else ""
    lines = [f"job {jid} {status}{took}{attempts}"]
    config = job.get("config") or {}
    lines.append(f"  model        {model_name(job.get('model'))} · {job.get('method')} {bits_of(job)} · "
                 f"preset {job.get('preset')}"
                 + (f" (iters {config['iters']})" if config.get("iters") is not None else ""))
    calib = f"  calibration  {job.get('calibration')}"
    used = ((report or {}).get("calibration") or {}).get("n") or config.get("calib_size")
    if report is not None and used is not None:
        calib += f" · {used} images used"
    elif used is not None:
        calib += f" · up to {used} images (calib_size)"
    lines.append(calib)
    error = job.get("error")
    if error:
        lines.append(f"  error        {error.get('code')}: {error.get('message')}")
    result = job.get("result") or {}
    if result.get("quant_top1") is not None:
        drop = (result["fp_top1"] - result["quant_top1"]) if result.get("fp_top1") is not None else None
        line = f"  top-1        FP {pct(result.get('fp_top1'))} -> quantized {pct(result['quant_top1'])}"
        if drop is not None:
            line += f" ({points(drop)})"
        lines.append(line + (f" on {result['n_eval']} images" if result.get("n_eval") else ""))
        if result.get("agreement") is not None:
            lines.append(f"  agreement    {pct(result['agreement'])} of predictions equal FP's · logit SQNR "
                         f"{result.get('logit_sqnr_db', float('nan')):.2f} dB")
    if result.get("target_message"):
        lines.append(f"  target       {'met' if result.get('target_met') else 'NOT met'}: {result['target_message']}")
    kept = ((report or {}).get("baseline_check") or {}).get("kept")
    if kept == "baseline":
        lines.append("  kept         RepQ-ViT's model: the I&S-ViT reconstruction was not better on held-out "
                     "calibration images (report.json baseline_check)")
    if result.get("checkpoint_bytes") is not None:
        sizes = f"  size         checkpoint {megabytes(result['checkpoint_bytes'])}"
        if result.get("onnx_bytes") is not None:
            sizes += f" · model.onnx {megabytes(result['onnx_bytes'])}"
        fp32 = ((report or {}).get("sizes") or {}).get("fp32_parameters_bytes")
        if fp32 and result.get("checkpoint_bytes"):
            sizes += f" · FP32 parameters {megabytes(fp32)} ({fp32 / result['checkpoint_bytes']:.1f}x smaller)"
        lines.append(sizes)
    if result.get("export_error"):
        lines.append(f"  no ONNX      {result['export_error']}")
    if status == "succeeded":
        lines.append(f"  next         vitq jobs download {jid} --out DIR   (report.html, checkpoint, model.onnx)")
    elif status in ("queued", "running"):
        lines.append(f"  next         vitq jobs wait {jid}   ·   vitq jobs cancel {jid}")
    return "\n".join(lines)


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)


def jobs_table(jobs: list[dict[str, Any]]) -> str:
    rows = []
    for job in jobs:
        result = job.get("result") or {}
        progress = job.get("progress") or {}
        state = job["status"]
        if state == "running" and progress.get("percent") is not None:
            state += f" {progress['percent']:.0f}%"
        rows.append([job["id"], state, model_name(job.get("model")), f"{job.get('method')} {bits_of(job)}",
                     pct(result.get("quant_top1")) if result.get("quant_top1") is not None else "",
                     str(job.get("created_at", ""))[:19].replace("T", " ")])
    return table(rows, ["ID", "STATUS", "MODEL", "CONFIG", "TOP-1", "CREATED (UTC)"])


def datasets_table(datasets: list[dict[str, Any]]) -> str:
    rows = [[d["id"], d.get("filename", ""), d.get("format", ""), str(d.get("n", "")),
             "x".join(str(s) for s in d.get("image_shape") or []),
             "yes" if d.get("has_labels") else "no", megabytes(d.get("size_bytes")),
             str(d.get("sha256", ""))[:12]] for d in datasets]
    return table(rows, ["ID", "FILE", "FORMAT", "IMAGES", "SHAPE", "LABELS", "SIZE", "SHA256"])


def events_table(events: list[dict[str, Any]]) -> str:
    rows = [[str(e.get("at", ""))[:19].replace("T", " "), str(e.get("kind", "")), str(e.get("message", ""))]
            for e in events]
    return table(rows, ["AT (UTC)", "EVENT", "MESSAGE"])


def metrics_line(metrics: dict[str, Any]) -> str:
    """``vitq evaluate``'s answer in the format ``vitq quantize`` uses: ``top-1 84.47 %  top-5 …  (n=10000)``."""
    return f"top-1 {pct(metrics.get('top1'))}  top-5 {pct(metrics.get('top5'))}  (n={metrics.get('n')})"
