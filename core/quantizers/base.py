"""What every quantizer shares: the enable/calibrate switches and the straight-through round."""

from __future__ import annotations

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


class ActQuantizer(nn.Module):
    """Base for fake-quantizers.

    ``enabled`` off makes the module the identity, which is how the float model, stage 1 of SOS
    (weights off) and the lossless-reparameterization test are expressed with one model.
    ``calibrating`` on makes the next forward set the parameters from the tensor it sees and
    pass the tensor through unchanged (or, with ``quantize_after_calibration``, quantized, so that
    one forward pass calibrates every quantizer on its upstream quantizers' output).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.enabled = False
        self.calibrating = False
        self.quantize_after_calibration = False
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def levels(self) -> int:
        return 2**self.bits

    def calibrate(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def codes(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Integer codes in [0, 2^b) that the quantized value is stored as."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            with torch.no_grad():
                self.calibrate(x.detach())
            self.initialized.fill_(True)
            return self.quantize(x) if self.quantize_after_calibration else x
        if not self.enabled:
            return x
        if x.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type):
            x = x.float()  # a fast-arithmetic training step (core.execution): quantizers stay in float32
        return self.quantize(x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"
