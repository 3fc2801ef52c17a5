"""One quantization run end to end: the code path shared by the CLI and the service worker.

Build the float model, read the data, measure the float model, quantize, measure the quantized
model, and write ``checkpoint.safetensors`` and ``report.json`` into ``out_dir``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.atomic_file import atomic_file
from core.calibration_sample import CalibrationSample, calibration_sample
from core.checkpoint import library_versions, save
from core.config import ACT_INIT_IMAGES, Preset, QuantConfig
from core.data import ImageDataset, load_dataset
from core.device import resolve_device
from core.evaluate import accuracy, agreement, dataset_labels, predict_logits
from core.export.artifacts import DEFAULT_EXPORTS, check_exports, fp32_parameter_bytes, write_exports
from core.finite_json import finite_json
from core.float_model import check_fp_accuracy, load_float_model, weights_record
from core.hub_weights import HubPolicy
from core.models import ModelSpec, resolve_model_spec
from core.quantize import ProgressFn, QuantizedModel, StopFn, quantize
from core.wrap import weight_layers

REPORT_VERSION = 1


@torch.no_grad()
def layer_sqnr(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor) -> list[dict[str, Any]]:
    """SQNR (dB) of every quantized layer's output against the float model's same layer.

    Each model runs on its own inputs, so the figure is the error accumulated up to that layer.
    """
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    names = [name for name, _ in weight_layers(qmodel)]
    for model, slot in ((fp_model, 0), (qmodel, 1)):
        for name in names:
            def hook(_m, _a, out, name=name, slot=slot):
                outputs.setdefault(name, [None, None])[slot] = out.detach().float()
            handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        fp_model(images)
        qmodel(images)
    finally:
        for handle in handles:
            handle.remove()
    result = []
    for name in names:
        ref, quant = outputs[name]
        noise = (quant - ref).pow(2).sum().clamp_min(1e-30)
        result.append({"name": name, "sqnr_db": round(float(10 * torch.log10(ref.pow(2).sum() / noise)), 3)})
    return result


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path, ".json") as tmp:
        tmp.write_text(json.dumps(finite_json(data), indent=2, allow_nan=False))


def _preset_reason(requested: Preset, config: QuantConfig, device: torch.device) -> str:
    if requested != Preset.AUTO:
        return f"preset {requested.value} was asked for"
    where = "an accelerator" if device.type != "cpu" else "a CPU"
    return f"auto: the job ran on {where} ({device}), so preset {config.preset.value}"


def run_quantization(
    model_spec: str | dict[str, Any] | ModelSpec,
    config: QuantConfig,
    calibration: str,
    evaluation: str | None,
    out_dir: str | Path,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: str | torch.device | None = None,
    exports: tuple[str, ...] | list[str] = DEFAULT_EXPORTS,
    hub_policy: HubPolicy | None = None,
    allow_chance_fp: bool = False,
) -> dict[str, Any]:
    """Quantize and evaluate; write ``checkpoint.safetensors``, ``report.json`` and each of ``exports``
    (``"onnx"``: ``model.onnx``; an export that fails is recorded in the report, not raised); return
    the report.

    Hub weights are fetched under ``hub_policy`` (default: from the environment) in a ``fetch_weights``
    stage. A float model at chance level on labelled evaluation data fails before quantization
    (``ModelAtChanceError``) unless ``allow_chance_fp``."""
    started = time.perf_counter()
    spec = resolve_model_spec(model_spec, hub_policy)
    dev = resolve_device(device)
    requested_preset = config.preset
    config = config.for_device(dev.type).resolved()
    exports = check_exports(exports)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def emit(stage: str) -> None:
        if progress is not None:
            progress({"stage": stage, "unit": "", "index": 0, "total": 1, "loss": None, "done": 0, "total_steps": 0})

    t0 = time.perf_counter()
    spec, model = load_float_model(spec, hub_policy, progress)
    emit("load")
    model = model.to(dev)
    calib_ds = load_dataset(calibration, spec.preprocess)
    sample = calibration_sample(calib_ds, config.calib_size, config.seed)
    calib = sample.images
    eval_ds = load_dataset(evaluation, spec.preprocess) if evaluation else None
    labels = dataset_labels(eval_ds) if eval_ds is not None else None
    seconds["load"] = time.perf_counter() - t0

    fp_metrics: dict[str, Any] | None = None
    fp_logits = None
    if eval_ds is not None:
        emit("evaluate_fp")
        t0 = time.perf_counter()
        fp_logits = predict_logits(model, eval_ds, dev, should_stop)
        fp_metrics = accuracy(fp_logits, labels)
        seconds["evaluate_fp"] = time.perf_counter() - t0
        fp_chance = check_fp_accuracy(fp_metrics, labels, spec, allow_chance_fp)
    weights = weights_record(spec)

    qmodel = quantize(model, config, calib, progress=progress, should_stop=should_stop, device=dev)
    seconds.update(qmodel.seconds)
    seconds.pop("total", None)

    quant_metrics: dict[str, Any] | None = None
    if eval_ds is not None:
        emit("evaluate_quant")
        t0 = time.perf_counter()
        q_logits = predict_logits(qmodel.model, eval_ds, dev, should_stop)
        quant_metrics = {**accuracy(q_logits, labels), **agreement(fp_logits, q_logits)}
        seconds["evaluate_quant"] = time.perf_counter() - t0

    return write_run_outputs(RunRecord(
        model=model, qmodel=qmodel, spec=spec, requested_preset=requested_preset, device=dev, calib=calib,
        calibration=calibration, calib_ds=calib_ds, sample=sample, evaluation=evaluation, eval_ds=eval_ds,
        fp_metrics=fp_metrics, quant_metrics=quant_metrics,
        report_extra={"weights": weights, **({"fp_chance": fp_chance} if eval_ds is not None else {})},
        metadata_extra={"weights": weights},
    ), out, exports, seconds, started, emit)


@dataclass
class RunRecord:
    """What a finished quantization run hands to ``write_run_outputs``: the float and quantized models
    and the data and metrics that the report and the checkpoint header describe."""

    model: nn.Module
    qmodel: QuantizedModel
    spec: ModelSpec
    requested_preset: Preset
    device: torch.device
    calib: torch.Tensor
    calibration: str
    calib_ds: ImageDataset
    sample: CalibrationSample
    evaluation: str | None
    eval_ds: ImageDataset | None
    fp_metrics: dict[str, Any] | None
    quant_metrics: dict[str, Any] | None
    report_extra: dict[str, Any] = field(default_factory=dict)
    metadata_extra: dict[str, Any] = field(default_factory=dict)
    sizes_extra: dict[str, Any] = field(default_factory=dict)


def write_run_outputs(
    run: RunRecord,
    out: Path,
    exports: tuple[str, ...],
    seconds: dict[str, float],
    started: float,
    emit: Callable[[str], None],
) -> dict[str, Any]:
    """Write ``checkpoint.safetensors``, the exports and ``report.json`` of a finished run; return the
    report. One place for a fixed-bits run and an accuracy-target search, so that their reports and
    checkpoint headers cannot drift apart."""
    qmodel, dev = run.qmodel, run.device
    config = qmodel.config
    layers = layer_sqnr(run.model.eval(), qmodel.model, run.calib[:ACT_INIT_IMAGES].to(dev))
    spec_public = {**run.spec.to_dict(), "checkpoint": None}
    fingerprint = run.calib_ds.fingerprint
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "model": spec_public,
        "w_bits": config.w_bits,
        "a_bits": config.a_bits,
        "per_unit_bits": config.to_dict()["per_unit_bits"],
        "bits_label": config.bits_label(),
        "method": config.method.value,
        "preset": config.preset.value,
        "preset_requested": run.requested_preset.value,
        "preset_reason": _preset_reason(run.requested_preset, config, dev),
        "config": config.to_dict(),
        "calibration": {"source": run.calibration, "sha256": fingerprint, **run.sample.describe()},
        "evaluation": {"source": run.evaluation,
                       "sha256": run.eval_ds.fingerprint if run.eval_ds is not None else None},
        "fp": run.fp_metrics,
        "quant": run.quant_metrics,
        **run.report_extra,
        "reparam_logit_change": qmodel.reparam_logit_change,
        "reparam_float32": qmodel.reparam_float32,
        "baseline_check": qmodel.baseline_check,
        "reconstruction": qmodel.reconstruction,
        "layers": layers,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
    }
    emit("save")
    t0 = time.perf_counter()
    save(qmodel, out / "checkpoint.safetensors", metadata={
        "model": spec_public, "method": config.method.value, "w_bits": config.w_bits, "a_bits": config.a_bits,
        "per_unit_bits": report["per_unit_bits"], "calibration_sha256": fingerprint,
        "calibration_sample": run.sample.describe(), "fp": run.fp_metrics, "quant": run.quant_metrics,
        **run.metadata_extra,
    })
    seconds["save"] = time.perf_counter() - t0
    if exports:
        emit("export")
        t0 = time.perf_counter()
    report["exports"] = write_exports(qmodel.model, out, exports, report, fingerprint)
    if exports:
        seconds["export"] = time.perf_counter() - t0
    report["sizes"] = {"fp32_parameters_bytes": fp32_parameter_bytes(run.model), **run.sizes_extra,
                       "checkpoint_bytes": (out / "checkpoint.safetensors").stat().st_size,
                       "onnx_bytes": report["exports"].get("onnx", {}).get("bytes")}
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    report = finite_json(report)  # an undefined figure (the SQNR of constant logits) is null, not -inf
    write_json_atomic(out / "report.json", report)
    return report
