"""The float model a run starts from: its weights made local (the ``fetch_weights`` stage), what the report
says about them, and the early check that the float model is better than chance on the data.

Why the chance check: an ImageNet model named for 10-class data, a classifier reset by timm because the
class counts differ, or weights for another preprocessing all give an FP top-1 at chance level; quantizing
such a model costs the whole reconstruction time and reports a meaningless result. It fails first, with its
own error code, unless the caller explicitly goes on (then the report says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ModelSpecError
from core.file_hash import sha256_file
from core.hub_weights import HubPolicy
from core.models import ModelSpec, build_model, with_hub_weights

CHANCE_MARGIN_SE = 3.0
"""FP top-1 at most this many binomial standard errors above the majority-class rate counts as chance."""


class ModelAtChanceError(ModelSpecError):
    """The float model's top-1 on the labelled evaluation data is no better than chance."""

    code = "fp_accuracy_at_chance"


def load_float_model(spec: ModelSpec, hub_policy: HubPolicy | None = None,
                     progress: Callable[[dict[str, Any]], None] | None = None,
                     ) -> tuple[ModelSpec, nn.Module]:
    """``(spec, model)``: hub weights fetched first (a ``fetch_weights`` progress stage, bytes as steps),
    then the model built with them; the returned spec records where the weights came from."""
    if spec.weights_kind == "hub":
        if progress is not None:
            progress({"stage": "fetch_weights", "unit": spec.hub.repo_id if spec.hub else "", "index": 0,
                      "total": 1, "loss": None, "done": 0, "total_steps": 0})
        spec = with_hub_weights(spec, hub_policy, progress)
    return spec, build_model(spec, hub_policy)


def weights_record(spec: ModelSpec) -> dict[str, Any]:
    """Where the float weights came from, for the report and the checkpoint header: the hub repository,
    revision, commit, files and sha256; a checkpoint's sha256; or ``random`` (asked for)."""
    if spec.fetched is not None:
        return {**spec.fetched.provenance(), "model_id": spec.model_id, "from_cache": not spec.fetched.downloaded}
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint)
        sha = sha256_file(path)  # hashed once: a checkpoint can be hundreds of MB
        return {"source": "builtin" if spec.id else "checkpoint", "model_id": spec.id,
                "files": [{"name": path.name, "sha256": sha, "bytes": path.stat().st_size}],
                "weights_sha256": sha}
    return {"source": "random", "model_id": spec.model_id}


def chance_check(top1: float, labels: torch.Tensor) -> dict[str, Any]:
    """Compare FP top-1 with the majority-class rate ``p`` of ``labels``: at chance when
    ``top1 <= p + 3·sqrt(p(1-p)/n)``. A single-class evaluation set cannot tell (never at chance)."""
    n = int(labels.numel())
    if n == 0:
        return {"chance_top1": None, "threshold": None, "at_chance": False}
    counts = torch.bincount(labels.to(torch.int64).clamp_min(0))
    p = float(counts.max()) / n
    threshold = p + CHANCE_MARGIN_SE * math.sqrt(p * (1 - p) / n)
    at_chance = int((counts > 0).sum()) > 1 and top1 <= threshold
    return {"chance_top1": round(p, 6), "threshold": round(threshold, 6), "at_chance": bool(at_chance)}


def check_fp_accuracy(fp_metrics: dict[str, Any], labels: torch.Tensor, spec: ModelSpec,
                      allow_chance: bool = False) -> dict[str, Any]:
    """``chance_check`` on the float model, raising ``ModelAtChanceError`` unless ``allow_chance``."""
    result = chance_check(float(fp_metrics["top1"]), labels)
    allow_chance = allow_chance or spec.weights == "random"  # asked for random weights: chance is expected
    result["allowed"] = bool(allow_chance)
    if result["at_chance"] and not allow_chance:
        raise ModelAtChanceError(
            f"the float model {spec.model_id or spec.id or spec.timm_name} has top-1 {100 * fp_metrics['top1']:.2f} % "
            f"on the {int(labels.numel())} evaluation images, no better than chance (majority class "
            f"{100 * result['chance_top1']:.2f} %): its classifier, input channels or preprocessing do not fit "
            "this data (a classifier timm reset because the class counts differ, ImageNet weights on other "
            "labels). Quantizing it would spend the reconstruction time on a meaningless model; fix the model "
            "or data, or set allow_chance_fp to go on anyway"
        )
    return result
