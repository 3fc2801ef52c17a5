"""Accuracy and agreement of a model on a dataset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from core.data import ImageDataset
from core.device import resolve_device
from core.errors import CancelledError, DatasetError

EVAL_BATCH = 256


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: ImageDataset,
    device: str | torch.device | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Logits for every image, on the CPU, in dataset order; ``should_stop`` is polled per batch."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    out = []
    for x, _ in dataset.batches(EVAL_BATCH):
        if should_stop is not None and should_stop():
            raise CancelledError("cancelled during evaluation")
        out.append(model(x.to(dev)).float().cpu())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    if labels.numel() and int(labels.max()) >= logits.shape[1]:
        raise DatasetError(f"dataset has label {int(labels.max())} but the model has {logits.shape[1]} classes")
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct = topk == labels[:, None]
    n = int(labels.numel())
    return {"top1": float(correct[:, 0].float().mean()) if n else 0.0,
            "top5": float(correct.any(dim=1).float().mean()) if n else 0.0, "n": n}


def dataset_labels(dataset: ImageDataset) -> torch.Tensor:
    if not dataset.has_labels:
        raise DatasetError(f"{dataset.source}: evaluation needs labels (an ImageFolder or an .npz with 'y')")
    return torch.tensor(np.asarray(dataset.labels), dtype=torch.int64)


def evaluate(model: nn.Module, dataset: ImageDataset, device: str | torch.device | None = None) -> dict[str, Any]:
    """``{"top1", "top5", "n"}``, fractions; ``model`` may be a module or a ``QuantizedModel``."""
    module = getattr(model, "model", model)
    labels = dataset_labels(dataset)
    return accuracy(predict_logits(module, dataset, device), labels)


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement with the float model and logit SQNR (dB): finer than top-1 on easy data."""
    agree = float((reference.argmax(1) == logits.argmax(1)).float().mean())
    noise = (logits - reference).pow(2).sum()
    sqnr = float(10 * torch.log10(reference.pow(2).sum() / noise.clamp_min(1e-30)))
    return {"agreement": agree, "logit_sqnr_db": sqnr}
