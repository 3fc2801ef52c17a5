"""Initialise quantizer parameters from data (activations) or from the weights themselves."""

from __future__ import annotations

import torch
from torch import nn

from core.wrap import quantizers, weight_layers


@torch.no_grad()
def calibrate_activations(model: nn.Module, images: torch.Tensor, *, in_forward_order: bool = False) -> None:
    """One forward pass with every activation quantizer in calibration mode.

    By default each quantizer fits its range to the float tensor it sees and passes it through, so
    all of them are initialised on full-precision activations, as the paper prescribes. With
    ``in_forward_order`` each one passes on its quantized output instead, so every quantizer
    downstream is fitted to what it will really see (the authors' code; weights are whatever the
    model's weight quantizers currently do).
    """
    found = list(quantizers(model))
    for _, q in found:
        q.calibrating = True
        q.quantize_after_calibration = in_forward_order
    try:
        model(images)
    finally:
        for _, q in found:
            q.calibrating = False
            q.quantize_after_calibration = False


@torch.no_grad()
def init_weight_quantizers(model: nn.Module) -> None:
    for _, layer in weight_layers(model):
        layer.init_weight_quantizer()
