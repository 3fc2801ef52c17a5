"""Logarithmic post-Softmax quantizers used as baselines and ablations.

``Log2Quantizer`` is the plain log2 quantizer of the paper's Fig. 1, whose clamp collapses the
whole small-value tail into one code; ``LogSqrt2Quantizer`` is RepQ-ViT's log-sqrt2 quantizer.
"""

from __future__ import annotations

import math

import torch

from core.quantizers.base import ActQuantizer, round_ste

_TINY = 1e-20
SQRT2_PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)


class Log2Quantizer(ActQuantizer):
    """``q = clamp(round(-log2 x), 0, 2^b - 1)``, ``x̂ = 2^-q``. Parameter-free."""

    def calibrate(self, x: torch.Tensor) -> None:
        """Nothing to fit: the code grid is fixed powers of two."""

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(-torch.log2(x.clamp_min(_TINY))), 0, self.levels - 1)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(round_ste(-torch.log2(x.clamp_min(_TINY))), 0, self.levels - 1)
        return torch.exp2(-q)


class LogSqrt2Quantizer(ActQuantizer):
    """RepQ-ViT: ``q = round(-2 log2(x/s))``; codes ``q >= 2^b`` become 0;
    ``x̂ = s · 2^(-ceil(q/2)) · (sqrt2 if q odd else 1)``. ``s`` is MSE-searched over percentiles."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.register_buffer("scale", torch.tensor(1.0))

    def _dequant(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        q = round_ste(-2 * torch.log2((x / scale).clamp_min(_TINY))).clamp_min(0)
        outside = q >= self.levels
        q = q.clamp(max=self.levels - 1)
        # s * 2^(-ceil(q/2)) * sqrt2^(q odd) == s * 2^(-q/2) for integer q.
        deq = scale * torch.exp2(-q / 2)
        return torch.where(outside, torch.zeros_like(deq), deq)

    def calibrate(self, x: torch.Tensor) -> None:
        flat = x.float().reshape(-1)
        sorted_x, _ = flat.sort()
        n = sorted_x.numel()
        best_err, best_scale = math.inf, sorted_x[-1]
        for p in SQRT2_PERCENTILES:
            scale = sorted_x[min(n - 1, round(p * (n - 1)))].clamp_min(1e-8)
            err = (self._dequant(flat, scale) - flat).pow(2).mean().item()
            if err < best_err:
                best_err, best_scale = err, scale
        self.scale = best_scale.detach().clone().reshape(())

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(-2 * torch.log2((x / self.scale).clamp_min(_TINY))).clamp_min(0)
        return q.clamp(max=self.levels - 1)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._dequant(x, self.scale)
