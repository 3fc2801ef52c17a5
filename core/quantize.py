"""``quantize``: the one verb. Dispatches on ``config.method`` to the three shared-engine methods.

isvit: calibrate (channel-wise post-LN, SULQ) → stage 1 (activations only, reconstruct with FP
inputs and targets) → stage 2 (lossless reparameterization) → stage 3 (weights too, reconstruct
with quantized inputs, FP targets). repq: calibrate → reparameterize → weights. ptq-uniform:
calibrate layer-wise → weights.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.calibrate import calibrate_activations, init_weight_quantizers
from core.config import ACT_INIT_IMAGES, CalibrationOrder, Method, QuantConfig
from core.device import resolve_device
from core.errors import CancelledError, DatasetError
from core.execution import current as current_execution
from core.quantizers import LogSqrt2Quantizer, SelectQuantizer
from core.reconstruct import (
    UnitResult,
    capture_unit_io,
    chain_links,
    has_nothing_to_learn,
    holdout_split,
    reconstruct_unit,
    reconstruct_units,
    run_unit,
    trainable_parameters,
)
from core.reparameterize import reparameterize
from core.unit_cache import UnitCache, fingerprint
from core.wrap import find_ln_pairs, find_units, set_quant_state, wrap_model

# How many standard errors of the paired held-out difference the reconstruction must win by
# before it replaces RepQ-ViT's model (one-sided, about 98 % confidence).
BASELINE_MARGIN_SE = 2.0

ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]


@dataclass
class QuantizedModel:
    """The fake-quantized model plus what it took to make it (for the report and checkpoint)."""

    model: nn.Module
    config: QuantConfig
    seconds: dict[str, float] = field(default_factory=dict)
    reconstruction: list[dict[str, Any]] = field(default_factory=list)
    reparam_logit_change: float | None = None
    reparam_float32: dict[str, Any] | None = None
    baseline_check: dict[str, Any] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Progress:
    """Counts optimisation steps across stages so callers can show percent and ETA."""

    def __init__(self, callback: ProgressFn | None, total_steps: int) -> None:
        self.callback, self.total_steps, self.done = callback, total_steps, 0

    def emit(self, stage: str, unit: str, index: int, total: int, loss: float | None = None) -> None:
        if self.callback is not None:
            self.callback(
                {"stage": stage, "unit": unit, "index": index, "total": total, "loss": loss,
                 "done": self.done, "total_steps": self.total_steps}
            )


def _check_stop(should_stop: StopFn | None) -> None:
    if should_stop is not None and should_stop():
        raise CancelledError("cancelled")


def _unit_log(stage: str, name: str, result: UnitResult) -> dict[str, Any]:
    return {"stage": stage, "unit": name, "loss_start": result.loss_start, "loss_end": result.loss_end,
            "loss_trained": result.loss_trained, "reverted": result.reverted, "skipped": result.skipped,
            **({"softmax_quantizers": result.softmax_choice} if result.softmax_choice else {})}


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, each storage once (a unit's input is often its neighbour's target)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@dataclass
class _Job:
    """A unit waiting for its optimisation: where it is, its cached inputs and targets, its cache key."""

    index: int
    name: str
    inputs: torch.Tensor
    targets: torch.Tensor
    key: tuple | None


def _reconstruct_all(
    stage: str,
    model: nn.Module,
    fp_model: nn.Module,
    images: torch.Tensor,
    config: QuantConfig,
    progress: _Progress,
    should_stop: StopFn | None,
    inputs_from_fp: bool,
    split: tuple[torch.Tensor, torch.Tensor],
    choose_softmax: bool = False,
    cache: tuple[UnitCache, tuple] | None = None,
    concurrent: bool | None = None,
) -> list[dict[str, Any]]:
    """Reconstruct every unit in forward order.

    Targets always come from the float model. Inputs come from the float model (stage 1) or from
    the quantized model with every earlier unit already reconstructed (stage 3). Where a unit
    feeds the next directly, the next input is computed from the cached one in a single pass.
    With ``cache`` (a ``UnitCache`` and the data fingerprint) a unit reconstructed before under the
    same key is restored instead of optimised again. A unit with nothing quantized in it and float
    inputs (stage 1's patch embedding) is skipped without capturing or running anything.

    With float inputs the units are independent, and ``concurrent`` (default: ``core.execution``'s
    ``concurrent_stage1``) trains them together, in waves of at most ``wave_bytes`` of cached tensors,
    one optimiser step per iteration for all of a wave (``core.reconstruct.reconstruct_units``): the
    same parameters as one unit after another.
    """
    execution = current_execution()
    concurrent = inputs_from_fp and (execution.concurrent_stage1 if concurrent is None else concurrent)
    units = find_units(model)
    links = chain_links(fp_model, units, images[:2])
    log: list[dict[str, Any] | None] = []
    batch = max(config.batch_size, 64)
    fp_in = q_in = fp_out = None
    wave: list[_Job] = []

    def run_wave() -> None:
        if not wave:
            return
        done_before, first, last = progress.done, wave[0], wave[-1]
        label = first.name if len(wave) == 1 else f"{first.name} to {last.name} ({len(wave)} at once)"

        def on_step(step: int) -> None:
            progress.done = done_before + (step + 1) * len(wave)
            progress.emit(stage, label, last.index, len(units))

        results = reconstruct_units(
            [(model.get_submodule(job.name), job.inputs, job.targets, config.seed * 1000 + job.index)
             for job in wave],
            iters=config.iters, batch_size=config.batch_size, lr=config.lr, on_step=on_step,
            should_stop=should_stop, choose_softmax=choose_softmax, split=split,
        )
        progress.done = done_before + len(wave) * config.iters
        for job, result in zip(wave, results, strict=True):
            progress.emit(stage, job.name, job.index, len(units), loss=result.loss_end)
            log[job.index] = _unit_log(stage, job.name, result)
            if cache is not None:
                cache[0].put(job.key, model.get_submodule(job.name), log[job.index])
        wave.clear()

    for u, name in enumerate(units):
        _check_stop(should_stop)
        unit = model.get_submodule(name)
        idle = inputs_from_fp and config.iters > 0 and bool(trainable_parameters(unit)) and has_nothing_to_learn(unit)
        if idle:  # its loss is zero: nothing to capture or run (the next unit captures its own input)
            fp_in = q_in = fp_out = None
        elif links[u] and fp_out is not None:
            prev_q_in = q_in
            fp_in = fp_out
            q_in = fp_in if inputs_from_fp else run_unit(model.get_submodule(units[u - 1]), prev_q_in, batch)
            del prev_q_in
        else:
            fp_in = capture_unit_io(fp_model, name, images, batch, output=False)
            q_in = fp_in if inputs_from_fp else capture_unit_io(model, name, images, batch, output=False)
        if not idle:
            fp_out = run_unit(fp_model.get_submodule(name), fp_in, batch)
        key = cache[0].key(stage, config, units, u, cache[1]) if cache is not None else None
        hit = cache[0].get(key) if cache is not None else None
        if hit is not None:
            UnitCache.restore(unit, hit[0])
            progress.done += config.iters
            progress.emit(stage, name, u, len(units), loss=hit[1].get("loss_end"))
            log.append({**hit[1], "cached": True})
            continue
        if idle:
            progress.done += config.iters  # a skipped unit reports all its steps at once
            progress.emit(stage, name, u, len(units))
            result = UnitResult(0.0, 0.0, skipped=True)
            progress.emit(stage, name, u, len(units), loss=result.loss_end)
            log.append(_unit_log(stage, name, result))
            if cache is not None:
                cache[0].put(key, unit, log[-1])
            continue
        log.append(None)
        if concurrent:
            wave.append(_Job(u, name, q_in, fp_out, key))
            if _storage_bytes([t for job in wave for t in (job.inputs, job.targets)]) >= execution.wave_bytes:
                run_wave()
            continue

        def on_step(step: int, u: int = u, name: str = name, done_before: int = progress.done) -> None:
            progress.done = done_before + step + 1  # a skipped unit reports all its steps at once
            progress.emit(stage, name, u, len(units))

        result = reconstruct_unit(
            unit, q_in, fp_out, iters=config.iters, batch_size=config.batch_size,
            lr=config.lr, seed=config.seed * 1000 + u, on_step=on_step, should_stop=should_stop,
            choose_softmax=choose_softmax, split=split,
        )
        progress.emit(stage, name, u, len(units), loss=result.loss_end)
        log[-1] = _unit_log(stage, name, result)
        if cache is not None:
            cache[0].put(key, unit, log[-1])
    run_wave()
    return log


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: torch.Tensor,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: str | torch.device | None = None,
    unit_cache: UnitCache | None = None,
) -> QuantizedModel:
    """Quantize a copy of ``model`` (a timm ViT/DeiT/Swin) with ``config`` on calibration images.

    ``calib`` is a float tensor N×C×H×W, already preprocessed, in sample order: the first 64 images
    initialise the activation quantizers (``core.calibration_sample`` draws a stratified sample in
    that order); a tensor larger than ``config.calib_size`` is subsampled at random. ``should_stop`` is polled between
    optimisation steps; when it returns True a ``CancelledError`` is raised within one step.
    ``unit_cache`` (``core.unit_cache``), shared by calls on the same model and images, restores units
    that an earlier call reconstructed under the same bits instead of optimising them again.
    """
    dev = resolve_device(device)
    config = config.for_device(dev.type).resolved()
    if not isinstance(calib, torch.Tensor) or calib.dim() != 4 or calib.shape[0] == 0:
        raise DatasetError("calibration data must be a non-empty N×C×H×W tensor")
    torch.manual_seed(config.seed)
    if calib.shape[0] > config.calib_size:  # never "the first N": a class-sorted tensor would give one class
        chosen = torch.randperm(calib.shape[0], generator=torch.Generator().manual_seed(config.seed))
        calib = calib[chosen[: config.calib_size]]
    elif calib.shape[0] < config.calib_size:  # fewer images than asked: the config records what ran
        config = dataclasses.replace(config, calib_size=int(calib.shape[0]))
    images = calib.to(dev, torch.float32)
    init_images = images[:ACT_INIT_IMAGES]
    qmodel = wrap_model(copy.deepcopy(model).float(), config).to(dev).eval()
    fp_model = copy.deepcopy(qmodel)
    for p in list(qmodel.parameters()) + list(fp_model.parameters()):
        p.requires_grad_(False)

    units = len(find_units(qmodel))
    recon_stages = 0
    if config.method == Method.ISVIT:
        recon_stages = 2 if config.sos else 1
    tracker = _Progress(progress, units * config.iters * recon_stages)
    result = QuantizedModel(qmodel, config)
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.seconds[name] = result.seconds.get(name, 0.0) + now - clock
        clock = now

    tracker.emit("calibrate", "", 0, 1)
    in_forward_order = config.calibration_order == CalibrationOrder.FORWARD
    if in_forward_order and not (config.method == Method.ISVIT and config.sos):
        init_weight_quantizers(qmodel)  # these methods quantize weights before anything else is tuned
        set_quant_state(qmodel, weights=True, activations=False)
    calibrate_activations(qmodel, init_images, in_forward_order=in_forward_order)
    set_quant_state(qmodel, weights=False, activations=False)
    baseline = _without_reconstruction(qmodel) if config.method == Method.ISVIT else None
    split = holdout_split(images.shape[0], config.seed, dev)  # one held-out set for every stage and the final check
    cache = None
    if unit_cache is not None and UnitCache.usable(config):
        cache = (unit_cache, fingerprint(model, images))
    _check_stop(should_stop)
    lap("calibrate")

    if config.method == Method.ISVIT and config.sos:
        set_quant_state(qmodel, weights=False, activations=True)
        result.reconstruction += _reconstruct_all(
            "stage1", qmodel, fp_model, images, config, tracker, should_stop, inputs_from_fp=True,
            split=split, choose_softmax=True, cache=cache,
        )
        lap("stage1")
        result.reparam_logit_change, result.reparam_float32 = _reparameterize_measured(qmodel, init_images)
        tracker.emit("stage2", "", 1, 1)
        lap("stage2")
        init_weight_quantizers(qmodel)
        set_quant_state(qmodel, weights=True, activations=True)
        result.reconstruction += _reconstruct_all(
            "stage3", qmodel, fp_model, images, config, tracker, should_stop, inputs_from_fp=False, split=split,
            cache=cache,
        )
        lap("stage3")
    else:
        if config.method in (Method.ISVIT, Method.REPQ):
            set_quant_state(qmodel, weights=False, activations=True)  # measured as in SOS: activations on
            result.reparam_logit_change, result.reparam_float32 = _reparameterize_measured(qmodel, init_images)
            lap("reparameterize")
        init_weight_quantizers(qmodel)
        set_quant_state(qmodel, weights=True, activations=True)
        lap("weights")
        if config.method == Method.ISVIT:
            result.reconstruction += _reconstruct_all(
                "reconstruct", qmodel, fp_model, images, config, tracker, should_stop, inputs_from_fp=False,
                split=split, choose_softmax=True, cache=cache,
            )
            lap("reconstruct")
    if baseline is not None:
        _keep_the_better(result, baseline, fp_model, images[split[1]])
        lap("baseline_check")
    result.seconds["total"] = sum(result.seconds.values())
    return result


@torch.no_grad()
def _without_reconstruction(calibrated: nn.Module) -> nn.Module:
    """The calibrated model finished without any reconstruction, log√2 wherever a post-Softmax
    quantizer may choose it: for the default isvit this is exactly RepQ-ViT's model (same quantizers,
    same calibration images, same lossless stage 2, weights initialised after it)."""
    model = copy.deepcopy(calibrated)
    for module in model.modules():
        if isinstance(module, SelectQuantizer):
            kinds = [isinstance(c, LogSqrt2Quantizer) for c in module.candidates]
            if any(kinds):
                module.choice.fill_(kinds.index(True))
    set_quant_state(model, weights=False, activations=True)
    reparameterize(model)
    init_weight_quantizers(model)
    set_quant_state(model, weights=True, activations=True)
    return model


@torch.no_grad()
def _keep_the_better(
    result: QuantizedModel, baseline: nn.Module, fp_model: nn.Module, held_images: torch.Tensor
) -> None:
    """isvit never returns a model worse than RepQ-ViT's: compare both with the float model's logits
    on the calibration images that no unit was optimised on, and keep the reconstruction only when it
    is better by more than the noise of that comparison.

    The comparison is paired (the same images through both models). At 6 bits the two models differ by
    less than a hundred-odd images can resolve, and picking the lower of two noisy numbers then picks
    the reconstruction about half the time even where it is no better: on the 10k test set it lost
    0.25 points of agreement with FP to RepQ-ViT that way. So the reconstruction has to win by
    ``BASELINE_MARGIN_SE`` standard errors of the per-image difference; otherwise RepQ-ViT's model,
    the one with fewer fitted parameters, is kept.
    """
    reference = torch.cat([fp_model(x) for x in held_images.split(64)]).double()

    def per_image_mse(model: nn.Module) -> torch.Tensor:
        logits = torch.cat([model(x) for x in held_images.split(64)]).double()
        return (logits - reference).pow(2).flatten(1).mean(dim=1)

    reconstructed, plain = per_image_mse(result.model), per_image_mse(baseline)
    difference = reconstructed - plain
    n = difference.numel()
    mean = float(difference.mean())
    stderr = float(difference.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    kept = "reconstructed" if mean + BASELINE_MARGIN_SE * stderr < 0 else "baseline"
    if kept == "baseline":
        result.model = baseline
    result.baseline_check = {
        "kept": kept, "heldout_images": n,
        "logit_mse": {"reconstructed": float(reconstructed.mean()), "baseline": float(plain.mean())},
        "difference": {"mean": mean, "stderr": stderr, "margin_se": BASELINE_MARGIN_SE},
        "rule": f"reconstructed only if its held-out logit MSE is lower by more than {BASELINE_MARGIN_SE:g} "
                "standard errors of the paired per-image difference",
    }


def _relative_change(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after.double() - before.double()).norm() / before.double().norm().clamp_min(1e-30))


@torch.no_grad()
def _reparameterize_measured(model: nn.Module, images: torch.Tensor) -> tuple[float, dict[str, Any]]:
    """Apply stage 2; return the relative logit change it causes with the current quantizers on
    (measured on a float64 copy, where only the method can move the logits), and the float32 record.

    With the integer z̃ every code is the channel-wise one in exact arithmetic. In float32 the folded
    LayerNorm and bias round differently, a value within about 1e-6 of a rounding boundary can land
    on the other side, and a 3- or 4-bit model carries such a flip on to its logits; the record puts
    that beside the float32 model's own rounding noise (float32 against float64, before stage 2).
    """
    exact = copy.deepcopy(model).double()
    images64 = images.double()
    before64 = exact(images64)
    reparameterize(exact)
    change64 = _relative_change(exact(images64), before64)
    del exact

    pairs = find_ln_pairs(model)
    inputs: dict[int, torch.Tensor] = {}
    handles = [ln.register_forward_pre_hook(lambda m, a: inputs.__setitem__(id(m), a[0])) for ln, _ in pairs]
    try:
        before = model(images)
    finally:
        for handle in handles:
            handle.remove()
    codes_before = [linear.input_quantizer.codes(ln(inputs[id(ln)])) for ln, linear in pairs]
    reparameterize(model)
    after = model(images)
    changed = total = 0
    for (ln, linear), codes in zip(pairs, codes_before, strict=True):
        changed += int((linear.input_quantizer.codes(ln(inputs[id(ln)])) != codes).sum())
        total += codes.numel()
    return change64, {"logit_change_float32": _relative_change(after, before),
                      "float32_rounding_noise": _relative_change(before, before64),
                      "codes_changed": changed, "codes": total}
