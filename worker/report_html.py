"""``report.html``: the accuracy report with inline SVG plots (no plotting library, no scripts).

Plots: top-1/top-5 FP vs quantized; per-layer SQNR; reconstruction loss per block and stage.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

FP_COLOR, Q_COLOR, START_COLOR, END_COLOR = "#4878d0", "#ee854a", "#9aa5b1", "#2a9d8f"


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "n/a"


def _bar_chart(
    groups: list[tuple[str, list[tuple[str, float, str]]]], *, title: str, unit: str, log: bool = False
) -> str:
    """Horizontal grouped bars: ``[(label, [(series, value, color), ...]), ...]``."""
    values = [
        v for _, series in groups for _, v, _ in series if isinstance(v, int | float) and math.isfinite(v)
    ]
    if not values:
        return f"<p><em>{escape(title)}: no data.</em></p>"

    def scale(v: float) -> float:
        return math.log10(max(v, 1e-12)) if log else v

    scaled = [scale(v) for v in values]
    low = min(0.0, min(scaled)) if not log else min(scaled) - 0.5
    high = max(scaled) if max(scaled) > low else low + 1
    label_w, bar_w, row_h = 220, 420, 14
    rows = sum(len(s) for _, s in groups) + len(groups)
    height = 40 + rows * row_h
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 90}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">',
        f'<text x="4" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    y = 28
    for label, series in groups:
        parts.append(f'<text x="4" y="{y + 11}" font-size="11">{escape(label)}</text>')
        for name, value, color in series:
            if not isinstance(value, int | float) or not math.isfinite(value):
                y += row_h
                continue
            x0 = label_w + bar_w * (max(low, 0 if not log else low) - low) / (high - low)
            x1 = label_w + bar_w * (scale(value) - low) / (high - low)
            left, width = min(x0, x1), max(abs(x1 - x0), 1)
            text = f"{value:.4g}{unit}"
            parts.append(
                f'<rect x="{left:.1f}" y="{y + 2}" width="{width:.1f}" height="{row_h - 4}" fill="{color}">'
                f"<title>{escape(name)}: {escape(text)}</title></rect>"
                f'<text x="{max(x0, x1) + 4:.1f}" y="{y + 11}" font-size="10">'
                f"{escape(name)} {escape(text)}</text>"
            )
            y += row_h
        y += row_h
    parts.append("</svg>")
    return "".join(parts)


def render_report_html(report: dict[str, Any], *, job_id: str = "") -> str:
    fp = report.get("fp") or {}
    quant = report.get("quant") or {}
    model = report.get("model") or {}
    seconds = report.get("seconds") or {}
    name = model.get("id") or model.get("timm_name") or "model"
    title = f"vitq report: {name} W{report.get('w_bits')}A{report.get('a_bits')} {report.get('method')}"
    accuracy = _bar_chart(
        [
            ("top-1", [("FP", fp.get("top1"), FP_COLOR), ("quantized", quant.get("top1"), Q_COLOR)]),
            ("top-5", [("FP", fp.get("top5"), FP_COLOR), ("quantized", quant.get("top5"), Q_COLOR)]),
        ],
        title="Accuracy: full precision vs quantized",
        unit="",
    )
    layers = report.get("layers") or []
    sqnr = _bar_chart(
        [(str(layer.get("name")), [("SQNR", layer.get("sqnr_db"), Q_COLOR)]) for layer in layers],
        title="Per-layer output SQNR (dB, higher is better)",
        unit=" dB",
    )
    recon = report.get("reconstruction") or []
    loss = _bar_chart(
        [
            (
                f"{r.get('unit')} · {r.get('stage')}",
                [("start", r.get("loss_start"), START_COLOR), ("end", r.get("loss_end"), END_COLOR)],
            )
            for r in recon
        ],
        title="Block reconstruction loss per stage (log scale)",
        unit="",
        log=True,
    )
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(_pct(fp.get(k)))}</td><td>{escape(_pct(quant.get(k)))}</td></tr>"
        for k in ("top1", "top5")
    )
    timing = "".join(
        f"<tr><td>{escape(str(k))}</td><td>{float(v):.2f} s</td></tr>"
        for k, v in seconds.items()
        if isinstance(v, int | float)
    )
    extra = []
    for key, label in (("agreement", "prediction agreement"), ("logit_sqnr_db", "logit SQNR (dB)")):
        if isinstance(quant.get(key), int | float):
            extra.append(f"<li>{label}: {quant[key]:.4f}</li>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}
td,th{{padding:2px 10px;text-align:left}}</style>
</head><body>
<h1>{escape(title)}</h1>
<p>job {escape(job_id)} · preset {escape(str(report.get("preset")))}
 · device {escape(str(report.get("device")))} · evaluated on {escape(str(quant.get("n", "n/a")))} images</p>
<table><tr><th></th><th>FP</th><th>quantized</th></tr>{rows}</table>
<ul>{"".join(extra)}</ul>
<h2>Accuracy</h2>{accuracy}
<h2>Per-layer SQNR</h2>{sqnr}
<h2>Reconstruction</h2>{loss}
<h2>Time</h2><table>{timing}</table>
</body></html>
"""
