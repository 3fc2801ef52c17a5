"""Benchmarks as commands: methods × bit widths, and the I&S-ViT ablation, on one model.

The float model, the calibration images and the float logits on the evaluation set are computed
once and shared by every row, so rows differ only in how they quantize.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import QuantConfig, build_model, load_dataset, quantize, resolve_model_spec
from core.calibration_sample import CalibrationSample, calibration_sample
from core.checkpoint import library_versions
from core.device import resolve_device
from core.evaluate import accuracy, agreement, dataset_labels, predict_logits


@dataclass
class BenchSetup:
    model_name: str
    preset: str
    calib: str
    eval: str
    device: str | None = None
    calib_size: int | None = None
    iters: int | None = None


def run_rows(
    setup: BenchSetup,
    rows: list[dict[str, Any]],
    progress_factory: Callable[[str], Callable[[dict[str, Any]], None]] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Quantize and evaluate once per row (``QuantConfig`` fields plus an optional ``label``).

    ``on_row`` gets the report so far after every row, so a long run leaves its finished rows behind.
    """
    spec = resolve_model_spec(setup.model_name)
    dev = resolve_device(setup.device)
    model = build_model(spec).to(dev)
    calib_ds = load_dataset(setup.calib, spec.preprocess)
    eval_ds = load_dataset(setup.eval, spec.preprocess)
    labels = dataset_labels(eval_ds)
    t0 = time.perf_counter()
    fp_logits = predict_logits(model, eval_ds, dev)
    fp = accuracy(fp_logits, labels)
    fp_seconds = time.perf_counter() - t0
    samples: dict[tuple[int, int], CalibrationSample] = {}
    results: list[dict[str, Any]] = []
    report = {
        "model": setup.model_name, "preset": setup.preset, "calib": setup.calib, "eval": setup.eval,
        "device": str(dev), "threads": torch.get_num_threads(), "fp_top1": fp["top1"], "fp_top5": fp["top5"],
        "fp_eval_seconds": round(fp_seconds, 2), "versions": library_versions(), "results": results,
    }
    for row in rows:
        fields = {k: v for k, v in row.items() if k not in ("label", "arm")}
        fields.setdefault("preset", setup.preset)
        if setup.calib_size is not None:
            fields.setdefault("calib_size", setup.calib_size)
        if setup.iters is not None and fields.get("method", "isvit") == "isvit":
            fields.setdefault("iters", setup.iters)
        config = QuantConfig(**fields).for_device(dev.type).resolved()
        label = row.get("label") or f"{config.method.value} W{config.w_bits}A{config.a_bits}"
        callback = progress_factory(label) if progress_factory else None
        key = (config.calib_size, config.seed)
        if key not in samples:  # rows with the same size and seed calibrate on the same images
            samples[key] = calibration_sample(calib_ds, config.calib_size, config.seed)
        calib = samples[key].images
        t0 = time.perf_counter()
        qmodel = quantize(model, config, calib, progress=callback, device=dev)
        quant_seconds = time.perf_counter() - t0
        close = getattr(callback, "close", None)
        if close:
            close()
        q_logits = predict_logits(qmodel.model, eval_ds, dev)
        metrics = {**accuracy(q_logits, labels), **agreement(fp_logits, q_logits)}
        results.append({
            "label": label, "method": config.method.value, "w_bits": config.w_bits, "a_bits": config.a_bits,
            "softmax_quantizer": config.softmax_quantizer.value, "sos": config.sos,
            "integer_exponent": config.integer_exponent, "iters": config.iters, "calib_size": int(calib.shape[0]),
            "seed": config.seed, "preset": config.preset.value,
            "units_reverted": sum(1 for r in qmodel.reconstruction if r.get("reverted")),
            "kept": (qmodel.baseline_check or {}).get("kept"), "baseline_check": qmodel.baseline_check,
            "reparam_logit_change": qmodel.reparam_logit_change,
            "reparam_float32": qmodel.reparam_float32,
            "top1": metrics["top1"], "top5": metrics["top5"], "n": metrics["n"], "agreement": metrics["agreement"],
            "logit_sqnr_db": metrics["logit_sqnr_db"], "drop": fp["top1"] - metrics["top1"],
            "reconstruction_units": len({r["unit"] for r in qmodel.reconstruction}),
            "seconds": round(quant_seconds, 2), "eval_seconds": round(time.perf_counter() - t0 - quant_seconds, 2),
            "stage_seconds": {k: round(v, 2) for k, v in qmodel.seconds.items()},
        })
        del qmodel
        if on_row is not None:
            on_row(report)
    report["complete"] = True
    return report


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        f"model `{report['model']}`, preset `{report['preset']}`, calibration `{report['calib']}`, "
        f"evaluation `{report['eval']}`, device `{report['device']}`; FP top-1 {100 * report['fp_top1']:.2f}",
        "",
        "| row | W/A | top-1 | drop vs FP | top-1 agreement with FP | logit SQNR (dB) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['label']} | W{r['w_bits']}A{r['a_bits']} | {100 * r['top1']:.2f} | {100 * r['drop']:.2f} | "
            f"{100 * r['agreement']:.2f} | {r['logit_sqnr_db']:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def method_rows(bits: list[int], methods: list[str]) -> list[dict[str, Any]]:
    return [{"w_bits": b, "a_bits": b, "method": m} for b in bits for m in methods]


ABLATION_ARMS = ("sulq-or-logsqrt2", "sulq", "log2", "logsqrt2", "uniform", "sulq-sos-off")
"""Post-Softmax quantizer with SOS on (vitq's per-layer choice, then each quantizer alone), and SULQ
with SOS off (one reconstruction stage)."""


def ablation_rows(bits: int, arms: list[str] | None = None) -> list[dict[str, Any]]:
    """The I&S-ViT ablation rows, for ``arms`` (default: all of ``ABLATION_ARMS``)."""
    rows = []
    for arm in arms or ABLATION_ARMS:
        if arm not in ABLATION_ARMS:
            raise ValueError(f"unknown ablation arm {arm!r}; choose from {', '.join(ABLATION_ARMS)}")
        softmax, sos = arm.removesuffix("-sos-off"), not arm.endswith("-sos-off")
        rows.append({"w_bits": bits, "a_bits": bits, "method": "isvit", "softmax_quantizer": softmax, "sos": sos,
                     "label": f"{softmax}, SOS {'on' if sos else 'off'}"})
    return rows


def with_seeds(rows: list[dict[str, Any]], seeds: int) -> list[dict[str, Any]]:
    """Each row once per seed (0 … seeds-1): the seed draws the calibration sample and the
    reconstruction mini-batches, so the spread over seeds is the run-to-run noise of an arm."""
    if seeds <= 1:
        return rows
    out = []
    for row in rows:
        arm = row.get("label") or f"{row.get('method', 'isvit')} W{row['w_bits']}A{row['a_bits']}"
        out += [{**row, "seed": seed, "arm": arm, "label": f"{arm} (seed {seed})"} for seed in range(seeds)]
    return out


def summarize_seeds(report: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of top-1, agreement and logit SQNR, per arm."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for row, result in zip(rows, report["results"], strict=False):
        arms.setdefault(row.get("arm", result["label"]), []).append(result)
    summary = []
    for arm, results in arms.items():
        entry: dict[str, Any] = {"arm": arm, "seeds": [r["seed"] for r in results]}
        for key in ("top1", "agreement", "logit_sqnr_db"):
            values = [r[key] for r in results]
            entry[key] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        summary.append(entry)
    return summary


def seeds_table(summary: list[dict[str, Any]]) -> str:
    lines = ["| arm | seeds | top-1 (mean ± sd) | agreement with FP | logit SQNR (dB) |", "|---|---|---|---|---|"]
    for s in summary:
        t, a, q = s["top1"], s["agreement"], s["logit_sqnr_db"]
        lines.append(f"| {s['arm']} | {len(s['seeds'])} | {100 * t['mean']:.2f} ± {100 * t['std']:.2f} | "
                     f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f} | {q['mean']:.2f} ± {q['std']:.2f} |")
    return "\n".join(lines)
