"""SULQ, the shift-uniform-log2 quantizer for post-Softmax activations (I&S-ViT).

A b-bit uniform quantizer on ``t = -log2(x + η)`` over the calibrated range [t_min, t_max], so
the 2^b codes cover the whole small-value tail instead of clamping it to one code as a plain
log2 quantizer does. Exactly 2^b codes (the authors' code allows 2^b + 1; we do not).
"""

from __future__ import annotations

import math

import torch

from core.quantizers.base import ActQuantizer, round_ste

ETA_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)


class SULQ(ActQuantizer):
    """Quantize ``t = -log2(x + η)`` uniformly; dequantize ``x̂ = 2^(-round(s (q - z))) - η``.

    ``integer_exponent`` rounds the dequantized exponent so inference can use shifts; off, the
    exponent is used as is (an ablation). η is grid-searched once at calibration, then frozen.
    """

    def __init__(self, bits: int, integer_exponent: bool = True, eta_grid: tuple[float, ...] = ETA_GRID) -> None:
        super().__init__(bits)
        self.integer_exponent = integer_exponent
        self.eta_grid = eta_grid
        for name, value in (("eta", 1e-3), ("scale", 1.0), ("zero_point", 0.0), ("t_min", 0.0), ("t_max", 1.0)):
            self.register_buffer(name, torch.tensor(value))

    def _params(self, t_min: torch.Tensor, t_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((t_max - t_min) / (self.levels - 1)).clamp_min(1e-8)
        return scale, torch.round(-t_min / scale)

    def _dequant(
        self, x: torch.Tensor, eta: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        t = -torch.log2(x + eta)
        q = torch.clamp(round_ste(t / scale) + zero_point, 0, self.levels - 1)
        exponent = scale * (q - zero_point)
        if self.integer_exponent:
            exponent = round_ste(exponent)
        return torch.exp2(-exponent) - eta

    def calibrate(self, x: torch.Tensor) -> None:
        x = x.float().clamp_min(0)
        best = (math.inf, None)
        for eta_value in self.eta_grid:
            eta = torch.tensor(eta_value, device=x.device)
            t = -torch.log2(x + eta)
            t_min, t_max = t.min(), t.max()
            scale, zero = self._params(t_min, t_max)
            err = (self._dequant(x, eta, scale, zero) - x).pow(2).mean().item()
            if err < best[0]:
                best = (err, (eta, t_min, t_max, scale, zero))
        eta, t_min, t_max, scale, zero = best[1]
        self.eta, self.t_min, self.t_max = eta.reshape(()), t_min.reshape(()), t_max.reshape(())
        self.scale, self.zero_point = scale.reshape(()), zero.reshape(())

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        t = -torch.log2(x.clamp_min(0) + self.eta)
        return torch.clamp(torch.round(t / self.scale) + self.zero_point, 0, self.levels - 1)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._dequant(x.clamp_min(0), self.eta, self.scale, self.zero_point)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, integer_exponent={self.integer_exponent}, enabled={self.enabled}"
