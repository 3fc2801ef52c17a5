"""``a_bits = 16``: weight-only quantization. The activation stays float, in every mode.

It stands where an activation quantizer would, so a weight-only model has the same modules as any
other (``wrap_model``, ``core.load`` and the export see one structure); it is never enabled, has
nothing to calibrate, and the ONNX export leaves it out (the runtime computes in float, with 4-bit
weights through ``MatMulNBits``).
"""

from __future__ import annotations

import torch

from core.config import FLOAT_ACTIVATIONS
from core.quantizers.base import ActQuantizer

FLOAT_ACTIVATION_BITS = FLOAT_ACTIVATIONS


class FloatActivation(ActQuantizer):
    """The identity, whatever ``enabled`` or ``calibrating`` is set to."""

    def __init__(self) -> None:
        super().__init__(FLOAT_ACTIVATION_BITS)

    @property
    def enabled(self) -> bool:
        return False

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """Turning the quantizers on leaves a float activation float."""

    def calibrate(self, x: torch.Tensor) -> None:
        """Nothing to fit."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return "float (weight-only)"
