"""Initialise quantizer parameters from data (activations) or from the weights themselves."""

from __future__ import annotations

import torch
from torch import nn

from core.wrap import quantizers, weight_layers


@torch.no_grad()
def calibrate_activations(model: nn.Module, images: torch.Tensor) -> None:
    """One forward pass with every activation quantizer in calibration mode.

    Each quantizer fits its range to the float tensor it sees and passes it through, so all of
    them are initialised on full-precision activations, as the paper prescribes.
    """
    found = list(quantizers(model))
    for _, q in found:
        q.calibrating = True
    try:
        model(images)
    finally:
        for _, q in found:
            q.calibrating = False


@torch.no_grad()
def init_weight_quantizers(model: nn.Module) -> None:
    for _, layer in weight_layers(model):
        layer.init_weight_quantizer()
