"""Accuracy-target jobs: the smallest quantized model whose top-1 stays within a drop the user names.

``run_target_search(model, TargetSpec(max_top1_drop=0.01), base_config, calibration, evaluation, out)``
writes the same files as ``run_quantization`` (checkpoint, report, ONNX) for the configuration it chose.

The search, in order:

1. The evaluation set is split once (seeded, stratified by class) into a **decision** part, on which
   every trial is judged, and a **held-out** part that no decision looks at; the report gives top-1 on
   both (and on the whole set, which is what the checkpoint reproduces).
2. Per-unit sensitivity, once (``core.sensitivity``): the relative logit error when only that unit is
   quantized at the lowest candidate widths.
3. Uniform widths from the smallest model upward (``W3A3``, ``W4A4``, …; each weight width paired with
   the smallest allowed activation width not below it), until one meets the target.
4. Mixed precision between the largest uniform width that failed and the smallest that met it: the
   base is the failing width, and the units with the most logit error per byte they would add (tiny
   ones such as the patch embedding and the head come first when they matter at all) get the meeting
   width. The rungs of that ladder are ordered by size; a bisection over them finds the smallest rung
   that meets the target (this assumes the drop shrinks as units are raised, which is how the ladder is
   built; every rung tried is in the report).
5. The chosen model is the smallest trial that met the target; if none did, the one with the smallest
   drop (``target_met: false``). It is evaluated once more on the whole evaluation set, in order.

Every trial is a full ``quantize`` with the job's method and preset. Trials share the loaded data, the
calibration sample, the float model's logits and a ``UnitCache``: a unit reconstructed in an earlier
trial under the same bits (stage 1: its own bits; stage 3: its own and every earlier unit's) is restored
rather than optimised again, so a mixed trial re-optimises only the units from the first changed one on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.calibration_sample import calibration_sample, sample_indices
from core.config import MAX_BITS, MIN_BITS, Method, QuantConfig
from core.data import ImageDataset, load_dataset
from core.device import resolve_device
from core.errors import CancelledError, DatasetError, InvalidConfigError
from core.evaluate import EVAL_BATCH, accuracy, agreement, dataset_labels, predict_logits
from core.export.artifacts import DEFAULT_EXPORTS, check_exports
from core.float_model import check_fp_accuracy, load_float_model, weights_record
from core.hub_weights import HubPolicy
from core.models import ModelSpec, resolve_model_spec
from core.pipeline import RunRecord, write_run_outputs
from core.quantize import ProgressFn, QuantizedModel, StopFn, quantize
from core.sensitivity import model_bytes, unit_sensitivity
from core.unit_cache import UnitCache
from core.wrap import find_units

DEFAULT_W_BITS = (3, 4, 6, 8)
DEFAULT_A_BITS = (3, 4, 6, 8)
DEFAULT_MAX_TRIALS = 8
DEFAULT_DECISION_FRACTION = 0.5
MAX_TRIALS_LIMIT = 50
EVAL_STEP_WEIGHT = 3
"""Progress counts one evaluation batch (256 images, forward only) as this many optimisation steps
(batch 32, forward and backward), so percent and ETA cover the evaluations too."""


@dataclass(frozen=True)
class TargetSpec:
    """``{"max_top1_drop": 0.01, "w_bits": [3, 4, 6, 8], "a_bits": [3, 4, 6, 8], "max_trials": 8}``.

    ``max_top1_drop`` is a fraction (0.01 = one point of top-1), measured against the float model on
    the decision part of the evaluation set. ``decision_fraction`` of the evaluation images decide;
    the rest are held out. ``mixed: false`` tries uniform widths only.
    """

    max_top1_drop: float
    w_bits: tuple[int, ...] = DEFAULT_W_BITS
    a_bits: tuple[int, ...] = DEFAULT_A_BITS
    max_trials: int = DEFAULT_MAX_TRIALS
    decision_fraction: float = DEFAULT_DECISION_FRACTION
    mixed: bool = True

    def __post_init__(self) -> None:
        drop = self.max_top1_drop
        if isinstance(drop, bool) or not isinstance(drop, int | float) or not math.isfinite(drop) or not 0 <= drop < 1:
            raise InvalidConfigError(f"target.max_top1_drop must be a fraction in [0, 1), got {drop!r} "
                                     "(0.01 is one point of top-1)")
        object.__setattr__(self, "max_top1_drop", float(drop))
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not value or len(value) > MAX_BITS:
                raise InvalidConfigError(f"target.{name} must be a non-empty list of bit widths")
            for bits in value:
                if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                    raise InvalidConfigError(f"target.{name}: {bits!r} is not a bit width {MIN_BITS}–{MAX_BITS}")
            object.__setattr__(self, name, tuple(sorted(set(value))))
        trials = self.max_trials
        if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= MAX_TRIALS_LIMIT:
            raise InvalidConfigError(f"target.max_trials must be an integer 1–{MAX_TRIALS_LIMIT}, got {trials!r}")
        fraction = self.decision_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.1 <= fraction <= 0.9:
            raise InvalidConfigError(f"target.decision_fraction must be in [0.1, 0.9], got {fraction!r}")
        if not isinstance(self.mixed, bool):
            raise InvalidConfigError("target.mixed must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return {"max_top1_drop": self.max_top1_drop, "w_bits": list(self.w_bits), "a_bits": list(self.a_bits),
                "max_trials": self.max_trials, "decision_fraction": self.decision_fraction, "mixed": self.mixed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetSpec:
        if not isinstance(data, dict):
            raise InvalidConfigError("target must be an object")
        allowed = {"max_top1_drop", "w_bits", "a_bits", "max_trials", "decision_fraction", "mixed"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise InvalidConfigError(f"unknown target field(s): {', '.join(unknown)}")
        if "max_top1_drop" not in data:
            raise InvalidConfigError("target needs max_top1_drop")
        return cls(**{k: v for k, v in data.items() if v is not None})

    def uniform_widths(self) -> list[tuple[int, int]]:
        """Each weight width with the smallest activation width not below it (else the largest)."""
        pairs = []
        for w in self.w_bits:
            a = min((a for a in self.a_bits if a >= w), default=max(self.a_bits))
            pairs.append((w, a))
        return pairs


# --- the decision / held-out split ------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSplit:
    decision: np.ndarray
    heldout: np.ndarray

    def describe(self) -> dict[str, Any]:
        return {"decision_n": int(self.decision.size), "heldout_n": int(self.heldout.size)}


def split_evaluation(labels: np.ndarray, fraction: float, seed: int) -> EvalSplit:
    """A seeded split, stratified by class: ``fraction`` of the images decide, the rest are held out."""
    n = len(labels)
    if n < 2:
        raise DatasetError("a target job needs at least 2 labelled evaluation images (half decide, half are held out)")
    order = sample_indices(np.asarray(labels), n, n, seed + 7919)  # every prefix is class-proportional
    cut = min(n - 1, max(1, round(fraction * n)))
    return EvalSplit(np.sort(order[:cut]), np.sort(order[cut:]))


@torch.no_grad()
def predict_subset(model: nn.Module, dataset: ImageDataset, indices: np.ndarray, device: torch.device,
                   should_stop: StopFn | None, on_batch: Any = None) -> torch.Tensor:
    """Logits for ``dataset[indices]`` (on the CPU), decoded batch by batch."""
    model = model.to(device).eval()
    out = []
    for start in range(0, len(indices), EVAL_BATCH):
        if should_stop is not None and should_stop():
            raise CancelledError("cancelled during evaluation")
        x = dataset.take(indices[start:start + EVAL_BATCH])
        out.append(model(x.to(device)).float().cpu())
        if on_batch is not None:
            on_batch()
    return torch.cat(out) if out else torch.zeros(0)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if labels.numel() else 0.0


# --- candidates -------------------------------------------------------------------------------------


def mixed_ladder(
    low: tuple[int, int], high: tuple[int, int], sensitivity: list[dict[str, Any]], base: QuantConfig,
    fp_model: nn.Module,
) -> list[tuple[QuantConfig, list[str]]]:
    """Configs between uniform ``low`` (failed) and ``high`` (met), smallest first.

    Units are raised to ``high`` in the order of logit error per byte the raise adds; rung k raises the
    first k. The rungs kept: k = 1, 2, 3 and a quarter, half and three quarters of the units, so a
    bisection needs about three trials.
    """
    w_low, a_low = low
    w_high, a_high = high

    def added_bytes(item: dict[str, Any]) -> float:
        return max(1.0, item["params"] * (w_high - w_low) / 8)

    def score(item: dict[str, Any]) -> float:  # a non-finite error (None) is the most sensitive of all
        error = item["logit_error"]
        return -(math.inf if error is None else error / added_bytes(item))

    order = [s["unit"] for s in sorted(sensitivity, key=score)]
    n = len(order)
    counts = sorted({k for k in (1, 2, 3, round(n / 4), round(n / 2), round(3 * n / 4)) if 0 < k < n})
    rungs = []
    for k in counts:
        raised = order[:k]
        config = QuantConfig.from_dict({**base.to_dict(), "w_bits": w_low, "a_bits": a_low,
                                        "per_unit_bits": {u: [w_high, a_high] for u in raised}})
        rungs.append((config, raised))
    rungs.sort(key=lambda rung: model_bytes(fp_model, rung[0]))
    return rungs


# --- progress over the whole search -----------------------------------------------------------------


class _SearchProgress:
    """One ``done``/``total_steps`` across every trial and evaluation, so percent and ETA span the search.

    ``total_steps`` is what is done plus an upper bound on what may still come (the trials the search
    may still run, each as costly as the average so far), so the ETA can only fall as trials are ruled out.
    """

    def __init__(self, callback: ProgressFn | None, trial_steps: int, eval_batches: int) -> None:
        self.callback = callback
        self.trial_steps = trial_steps
        self.eval_steps = eval_batches * EVAL_STEP_WEIGHT
        self.done = 0
        self.trial_done = 0
        self.remaining_trials = 0
        self.label = ""

    def total(self) -> int:
        return self.done + max(0, self.trial_steps - self.trial_done) + self.remaining_trials * self.trial_steps

    def emit(self, stage: str, unit: str = "", index: int = 0, total: int = 1, loss: float | None = None) -> None:
        if self.callback is not None:
            self.callback({"stage": stage, "unit": unit, "index": index, "total": total, "loss": loss,
                           "done": self.done, "total_steps": self.total()})

    def start_trial(self, label: str, remaining_after: int) -> None:
        self.label, self.trial_done, self.remaining_trials = label, 0, remaining_after

    def trial_event(self, event: dict[str, Any]) -> None:
        step = int(event.get("done") or 0)
        if step > self.trial_done:
            self.done += step - self.trial_done
            self.trial_done = step
        self.emit(f"trial {self.label}: {event.get('stage')}", str(event.get("unit") or ""),
                  int(event.get("index") or 0), int(event.get("total") or 1), event.get("loss"))

    def eval_batch(self) -> None:
        self.done += EVAL_STEP_WEIGHT
        self.trial_done += EVAL_STEP_WEIGHT
        self.emit(f"trial {self.label}: evaluate")

    def end_trial(self) -> None:
        self.trial_done = self.trial_steps

    def finish(self, stage: str = "search done") -> None:
        """No trial is left: ``total_steps`` becomes ``done`` (100 %)."""
        self.remaining_trials = 0
        self.trial_done = self.trial_steps
        self.emit(stage)


# --- the search -------------------------------------------------------------------------------------


@dataclass
class Trial:
    index: int
    kind: str
    config: QuantConfig
    raised_units: list[str]
    size_bytes: int
    decision_top1: float = math.nan
    drop: float = math.nan
    meets: bool = False
    seconds: float = 0.0
    cache_hits: int = 0
    qmodel: QuantizedModel | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "label": self.config.bits_label(),
                "w_bits": self.config.w_bits, "a_bits": self.config.a_bits,
                "per_unit_bits": self.config.to_dict()["per_unit_bits"], "raised_units": self.raised_units,
                "size_bytes": self.size_bytes, "decision_top1": self.decision_top1, "drop": self.drop,
                "meets_target": self.meets, "seconds": round(self.seconds, 3), "cached_units": self.cache_hits}


def pareto_front(trials: Iterable[dict[str, Any]]) -> list[int]:
    """Indices of the trials no other trial beats on both size (smaller) and decision top-1 (higher)."""
    items = list(trials)
    front = []
    for t in items:
        dominated = any(
            o is not t and o["size_bytes"] <= t["size_bytes"] and o["decision_top1"] >= t["decision_top1"]
            and (o["size_bytes"] < t["size_bytes"] or o["decision_top1"] > t["decision_top1"])
            for o in items
        )
        if not dominated:
            front.append(t["index"])
    return front


def search(
    model: nn.Module,
    target: TargetSpec,
    base: QuantConfig,
    calib: torch.Tensor,
    eval_ds: ImageDataset,
    labels: torch.Tensor,
    split: EvalSplit,
    fp_decision_top1: float,
    device: torch.device,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> dict[str, Any]:
    """Run the trials (see the module docstring); returns the chosen trial, every trial and the sensitivity."""
    seconds: dict[str, float] = {}
    units = find_units(model)
    uniform = [QuantConfig.from_dict({**base.to_dict(), "w_bits": w, "a_bits": a, "per_unit_bits": None})
               for w, a in target.uniform_widths()]
    probe = uniform[0].for_device(device.type).resolved()
    stages = (2 if probe.sos else 1) if probe.method == Method.ISVIT else 0
    eval_batches = math.ceil(len(split.decision) / EVAL_BATCH)
    tracker = _SearchProgress(progress, len(units) * (probe.iters or 0) * stages + eval_batches * EVAL_STEP_WEIGHT,
                              eval_batches)
    tracker.remaining_trials = min(target.max_trials, len(uniform) + 3)
    tracker.emit("sensitivity")
    t0 = time.perf_counter()
    sensitivity = unit_sensitivity(model, uniform[0], calib, device)
    seconds["sensitivity"] = time.perf_counter() - t0
    if should_stop is not None and should_stop():
        raise CancelledError("cancelled")

    cache = UnitCache()
    trials: list[Trial] = []
    decision_labels = labels[torch.from_numpy(split.decision)]

    def run_trial(kind: str, config: QuantConfig, raised: list[str], remaining_after: int) -> Trial:
        if should_stop is not None and should_stop():
            raise CancelledError("cancelled between trials")
        trial = Trial(len(trials), kind, config, raised, model_bytes(model, config))
        tracker.start_trial(f"{trial.index + 1} {config.bits_label()}", remaining_after)
        started, hits_before = time.perf_counter(), cache.hits
        qmodel = quantize(model, config, calib, progress=tracker.trial_event, should_stop=should_stop,
                          device=device, unit_cache=cache)
        logits = predict_subset(qmodel.model, eval_ds, split.decision, device, should_stop, tracker.eval_batch)
        trial.decision_top1 = top1(logits, decision_labels)
        trial.drop = fp_decision_top1 - trial.decision_top1
        trial.meets = trial.drop <= target.max_top1_drop + 1e-12
        trial.seconds = time.perf_counter() - started
        trial.cache_hits = cache.hits - hits_before
        trial.qmodel = qmodel
        tracker.end_trial()
        tracker.emit(f"trial {trial.index + 1} {config.bits_label()}: top-1 {100 * trial.decision_top1:.2f} on the "
                     f"decision split, drop {100 * trial.drop:.2f} points, {'meets' if trial.meets else 'misses'} "
                     f"the target ({trial.size_bytes} B, {trial.seconds:.0f} s)")
        trials.append(trial)
        keep = _choose(trials)[0]
        for other in trials:  # a trial that is not the pick now never becomes it: free its model
            if other is not keep:
                other.qmodel = None
        return trial

    t0 = time.perf_counter()
    failed: Trial | None = None
    met: Trial | None = None
    for i, config in enumerate(uniform):
        if len(trials) >= target.max_trials:
            break
        trial = run_trial("uniform", config, [], min(target.max_trials - len(trials) - 1, len(uniform) - i - 1 + 3))
        if trial.meets:
            met = trial
            break
        failed = trial
    smallest_uniform = met
    if met is not None and failed is not None and target.mixed:
        rungs = mixed_ladder((failed.config.w_bits, failed.config.a_bits), (met.config.w_bits, met.config.a_bits),
                             sensitivity, base, model)
        low, high = -1, len(rungs)  # rung `low` fails (the uniform base), rung `high` meets
        while high - low > 1 and len(trials) < target.max_trials:
            mid = (low + high) // 2
            left = min(target.max_trials - len(trials) - 1, math.ceil(math.log2(max(1, high - low - 1))))
            config, raised = rungs[mid]
            trial = run_trial("mixed", config, raised, max(0, left))
            if trial.meets:
                high = mid
            else:
                low = mid
    seconds["trials"] = time.perf_counter() - t0
    tracker.finish()
    chosen, met_any = _choose(trials)
    described = [t.describe() for t in trials]
    return {"chosen": chosen, "target_met": met_any, "trials": described, "sensitivity": sensitivity,
            "steps": tracker.done,
            "smallest_uniform_meeting": smallest_uniform.describe() if smallest_uniform else None,
            "pareto_front": pareto_front(described), "seconds": seconds,
            "unit_cache": {"hits": cache.hits, "misses": cache.misses}}


def _choose(trials: list[Trial]) -> tuple[Trial, bool]:
    """The smallest trial that met the target; else the one with the smallest drop (then the smallest)."""
    meeting = [t for t in trials if t.meets]
    if meeting:
        return min(meeting, key=lambda t: (t.size_bytes, t.index)), True
    return min(trials, key=lambda t: (t.drop, t.size_bytes, t.index)), False


# --- the job ----------------------------------------------------------------------------------------


def _split_metrics(fp_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor,
                   indices: np.ndarray) -> dict[str, Any]:
    idx = torch.from_numpy(indices)
    fp, q = top1(fp_logits[idx], labels[idx]), top1(q_logits[idx], labels[idx])
    return {"n": int(indices.size), "fp_top1": fp, "quant_top1": q, "drop": fp - q}


def run_target_search(
    model_spec: str | dict[str, Any] | ModelSpec,
    target: TargetSpec,
    base: QuantConfig,
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
    """Search for the smallest configuration within ``target``; write its checkpoint, ``report.json`` (with
    every trial under ``"target"``) and exports, as ``run_quantization`` does; return the report.

    ``base`` gives the method, preset and options; its ``w_bits``/``a_bits`` are replaced by the trials'.
    """
    started = time.perf_counter()
    if not evaluation:
        raise DatasetError("a target job needs labelled evaluation data (evaluation): the target is a top-1 drop")
    spec = resolve_model_spec(model_spec, hub_policy)
    dev = resolve_device(device)
    requested_preset = base.preset
    base = base.for_device(dev.type)
    exports = check_exports(exports)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    steps = 0  # after the search, the stages that follow report it as done (100 %)

    def emit(stage: str) -> None:
        if progress is not None:
            progress({"stage": stage, "unit": "", "index": 0, "total": 1, "loss": None, "done": steps,
                      "total_steps": steps})

    t0 = time.perf_counter()
    spec, model = load_float_model(spec, hub_policy, progress)
    emit("load")
    model = model.to(dev)
    calib_size = base.resolved().calib_size or 1024
    calib_ds = load_dataset(calibration, spec.preprocess)
    sample = calibration_sample(calib_ds, calib_size, base.seed)
    calib = sample.images
    eval_ds = load_dataset(evaluation, spec.preprocess)
    labels = dataset_labels(eval_ds)
    split = split_evaluation(np.asarray(eval_ds.labels), target.decision_fraction, base.seed)
    seconds["load"] = time.perf_counter() - t0

    emit("evaluate_fp")
    t0 = time.perf_counter()
    fp_logits = predict_logits(model, eval_ds, dev, should_stop)
    fp_metrics = accuracy(fp_logits, labels)
    fp_decision_top1 = top1(fp_logits[torch.from_numpy(split.decision)], labels[torch.from_numpy(split.decision)])
    seconds["evaluate_fp"] = time.perf_counter() - t0
    fp_chance = check_fp_accuracy(fp_metrics, labels, spec, allow_chance_fp)

    found = search(model, target, base, calib, eval_ds, labels, split, fp_decision_top1, dev, progress, should_stop)
    seconds.update({f"search_{k}": v for k, v in found["seconds"].items()})
    steps = found["steps"]
    chosen: Trial = found["chosen"]
    qmodel = chosen.qmodel
    assert qmodel is not None  # _choose's pick is never released
    config = qmodel.config

    emit("evaluate_quant")
    t0 = time.perf_counter()
    q_logits = predict_logits(qmodel.model, eval_ds, dev, should_stop)  # the whole set, in order: what load reproduces
    quant_metrics = {**accuracy(q_logits, labels), **agreement(fp_logits, q_logits)}
    decision = _split_metrics(fp_logits, q_logits, labels, split.decision)
    heldout = _split_metrics(fp_logits, q_logits, labels, split.heldout)
    seconds["evaluate_quant"] = time.perf_counter() - t0

    met = found["target_met"]
    drop_pts = 100 * target.max_top1_drop
    if met:
        message = (f"target met: {config.bits_label()} loses {100 * chosen.drop:.2f} points of top-1 on the decision "
                   f"split (allowed {drop_pts:.2f}); {100 * heldout['drop']:.2f} on the held-out split")
    else:
        message = (f"target not met: no configuration tried kept top-1 within {drop_pts:.2f} points; the best found, "
                   f"{config.bits_label()}, loses {100 * chosen.drop:.2f} on the decision split")
    target_report = {
        **target.to_dict(), "target_met": met, "message": message,
        "chosen": {**chosen.describe(), "config": config.to_dict()},
        "decision": decision, "heldout": heldout,
        "split": {**split.describe(), "seed": base.seed, "stratified": True},
        "trials": found["trials"], "pareto_front": found["pareto_front"],
        "smallest_uniform_meeting": found["smallest_uniform_meeting"],
        "sensitivity": found["sensitivity"], "unit_cache": found["unit_cache"],
    }
    return write_run_outputs(RunRecord(
        model=model, qmodel=qmodel, spec=spec, requested_preset=requested_preset, device=dev, calib=calib,
        calibration=calibration, calib_ds=calib_ds, sample=sample, evaluation=evaluation, eval_ds=eval_ds,
        fp_metrics=fp_metrics, quant_metrics=quant_metrics,
        report_extra={"target": target_report, "weights": weights_record(spec), "fp_chance": fp_chance},
        metadata_extra={"weights": weights_record(spec),
                        "target": {k: target_report[k] for k in ("max_top1_drop", "target_met", "decision",
                                                                   "heldout")}},
        sizes_extra={"model_bytes": chosen.size_bytes},
    ), out, exports, seconds, started, emit)
