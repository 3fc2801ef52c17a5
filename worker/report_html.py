"""``report.html``: the accuracy report with inline SVG plots (no plotting library, no scripts).

Plots: top-1/top-5 FP vs quantized; per-layer SQNR; reconstruction loss per block and stage. A target
job adds its trials as a table and a size-vs-accuracy scatter with the Pareto front.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

FP_COLOR, Q_COLOR, START_COLOR, END_COLOR = "#4878d0", "#ee854a", "#9aa5b1", "#2a9d8f"
FRONT_COLOR, MISS_COLOR, CHOSEN_COLOR = "#2a9d8f", "#9aa5b1", "#d62728"


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


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def size_accuracy_plot(trials: list[dict[str, Any]], front: list[int], chosen: int | None,
                       fp_top1: float | None, max_drop: float | None) -> str:
    """Scatter of every trial: model size (MB) against decision-split top-1, the Pareto front joined by a
    line, the chosen trial ringed, and the float top-1 and the target as dashed lines."""
    points = [(t, _num(t.get("size_bytes")), _num(t.get("decision_top1"))) for t in trials]
    points = [(t, x / 1e6, y) for t, x, y in points if x is not None and y is not None]
    if not points:
        return "<p><em>Size vs accuracy: no trials.</em></p>"
    width, height, left, right, top, bottom = 640, 320, 60, 20, 30, 45
    xs = [x for _, x, _ in points]
    ys = [y for _, _, y in points]
    levels = [v for v in (fp_top1, None if fp_top1 is None or max_drop is None else fp_top1 - max_drop)
              if v is not None]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys + levels), max(ys + levels)
    if x_hi - x_lo < 1e-9:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = max(1e-3, 0.08 * (y_hi - y_lo))
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(x: float) -> float:
        return left + (width - left - right) * (x - x_lo) / (x_hi - x_lo) if x_hi > x_lo else width / 2

    def py(y: float) -> float:
        return top + (height - top - bottom) * (y_hi - y) / (y_hi - y_lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             'aria-label="Model size vs top-1, every trial">',
             '<text x="4" y="16" font-size="13" font-weight="bold">Model size vs top-1 (decision split); '
             'Pareto front joined</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#333"/>',
             f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" font-size="11" text-anchor="middle">'
             'model size (MB)</text>',
             f'<text x="12" y="{(top + height - bottom) / 2:.0f}" font-size="11" '
             f'transform="rotate(-90 12 {(top + height - bottom) / 2:.0f})" text-anchor="middle">top-1</text>']
    for value, label in ((x_lo, f"{x_lo:.2f}"), (x_hi, f"{x_hi:.2f}")):
        parts.append(f'<text x="{px(value):.1f}" y="{height - bottom + 14}" font-size="10" '
                     f'text-anchor="middle">{escape(label)}</text>')
    for value in (y_lo + pad, y_hi - pad):
        parts.append(f'<text x="{left - 4}" y="{py(value) + 3:.1f}" font-size="10" text-anchor="end">'
                     f'{100 * value:.1f}%</text>')
    for value, label in ((fp_top1, "float"), (levels[1] if len(levels) > 1 else None, "target")):
        if value is not None:
            parts.append(f'<line x1="{left}" y1="{py(value):.1f}" x2="{width - right}" y2="{py(value):.1f}" '
                         f'stroke="#888" stroke-dasharray="4 3"/><text x="{width - right - 2}" y="{py(value) - 3:.1f}"'
                         f' font-size="10" text-anchor="end">{escape(label)} {100 * value:.2f}%</text>')
    on_front = sorted((p for p in points if p[0].get("index") in front), key=lambda p: p[1])
    if len(on_front) > 1:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for _, x, y in on_front)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{FRONT_COLOR}" stroke-width="1.5"/>')
    for t, x, y in points:
        color = FRONT_COLOR if t.get("index") in front else MISS_COLOR
        tip = f"trial {t.get('index')}: {t.get('label')}, {x:.3f} MB, top-1 {100 * y:.2f}%"
        label = escape(str(t.get("label")))
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{color}"><title>{escape(tip)}</title>'
                     f'</circle><text x="{px(x) + 6:.1f}" y="{py(y) - 5:.1f}" font-size="9">{label}</text>')
        if t.get("index") == chosen:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="8" fill="none" stroke="{CHOSEN_COLOR}" '
                         'stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _target_section(report: dict[str, Any]) -> str:
    target = report.get("target")
    if not isinstance(target, dict):
        return ""
    trials = [t for t in target.get("trials") or [] if isinstance(t, dict)]
    front = [i for i in target.get("pareto_front") or [] if isinstance(i, int)]
    chosen = (target.get("chosen") or {}).get("index")
    decision, heldout = target.get("decision") or {}, target.get("heldout") or {}
    fp_decision = decision.get("fp_top1")
    rows = "".join(
        "<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in (
            t.get("index"), t.get("kind"), t.get("label"),
            f"{_num(t.get('size_bytes')) / 1e6:.3f} MB" if _num(t.get("size_bytes")) is not None else "n/a",
            _pct(t.get("decision_top1")),
            f"{100 * t['drop']:.2f}" if _num(t.get("drop")) is not None else "n/a",
            "yes" if t.get("meets_target") else "no",
            "yes" if t.get("index") in front else "",
            f"{float(t.get('seconds') or 0):.1f}",
            t.get("cached_units", ""),
        )) + ("<td><strong>chosen</strong></td>" if t.get("index") == chosen else "<td></td>") + "</tr>"
        for t in trials
    )
    verdict = "met" if target.get("target_met") else "NOT met"
    plot = size_accuracy_plot(trials, front, chosen, _num(fp_decision), _num(target.get("max_top1_drop")))
    return f"""<h2>Accuracy target: {escape(verdict)}</h2>
<p>{escape(str(target.get("message", "")))}</p>
<table><tr><th></th><th>decision split</th><th>held-out split</th></tr>
<tr><td>images</td><td>{escape(str(decision.get("n")))}</td><td>{escape(str(heldout.get("n")))}</td></tr>
<tr><td>FP top-1</td><td>{_pct(decision.get("fp_top1"))}</td><td>{_pct(heldout.get("fp_top1"))}</td></tr>
<tr><td>quantized top-1</td><td>{_pct(decision.get("quant_top1"))}</td><td>{_pct(heldout.get("quant_top1"))}</td></tr>
<tr><td>drop (points)</td><td>{_points(decision.get("drop"))}</td><td>{_points(heldout.get("drop"))}</td></tr></table>
<h3>Trials</h3>
<table><tr><th>#</th><th>kind</th><th>bits</th><th>size</th><th>top-1 (decision)</th><th>drop (points)</th>
<th>meets</th><th>Pareto</th><th>seconds</th><th>cached units</th><th></th></tr>{rows}</table>
{plot}
"""


def _points(value: Any) -> str:
    return f"{100 * value:.2f}" if _num(value) is not None else "n/a"


def render_report_html(report: dict[str, Any], *, job_id: str = "") -> str:
    fp = report.get("fp") or {}
    quant = report.get("quant") or {}
    model = report.get("model") or {}
    seconds = report.get("seconds") or {}
    name = model.get("id") or model.get("timm_name") or "model"
    bits = report.get("bits_label") or f"W{report.get('w_bits')}A{report.get('a_bits')}"
    title = f"vitq report: {name} {bits} {report.get('method')}"
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
{_target_section(report)}
<h2>Accuracy</h2>{accuracy}
<h2>Per-layer SQNR</h2>{sqnr}
<h2>Reconstruction</h2>{loss}
<h2>Time</h2><table>{timing}</table>
</body></html>
"""
