"""Uniform asymmetric quantizer with MSE-searched percentile ranges, per tensor or per channel.

The range search is vectorised over channels: one ``topk`` per tail takes each channel's k smallest
and k largest values (k is the deepest percentile asked for; no full sort), and every candidate
percentile pair is read off those rows, so a ViT-B layer costs a few tensor ops, not a Python loop
per channel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from core.quantizers.base import ActQuantizer, round_ste

ACT_PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.999, 0.9999, 0.99999, 1.0)


def _rows(x: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
    """View ``x`` as (channels, values); one row for a per-tensor quantizer."""
    if channel_dim is None:
        return x.reshape(1, -1)
    return x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)


def uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the range [lo, hi]: ``s = (hi - lo)/(2^b - 1)``, ``z = round(-lo/s)``."""
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zero_point = torch.round(-lo / scale)
    return scale, zero_point


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference formula with a straight-through round; used for range search over many candidates."""
    q = torch.clamp(round_ste(x * (1.0 / scale)) + zero_point, 0, 2**bits - 1)
    return scale * (q - zero_point)


def fused_fake_quant_per_channel(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, axis: int
) -> torch.Tensor:
    """``fake_quant`` through PyTorch's fused per-channel kernel (one pass, same STE gradient)."""
    return torch.fake_quantize_per_channel_affine(
        x, scale.reshape(-1).float(), zero_point.reshape(-1).to(torch.int32), axis, 0, 2**bits - 1
    )


def fused_fake_quant_per_tensor(x: torch.Tensor, s: float, z: float, bits: int) -> torch.Tensor:
    """``fake_quant`` through PyTorch's fused kernels (one pass, same straight-through gradient).

    A non-integer per-tensor zero point (stage 2's z̃) cannot go to the kernel; there
    ``s·clamp(round(x/s) + z, 0, L-1) - s·z == clamp(s·round(x/s), -s·z, s·(L-1-z))``, so the kernel
    runs with zero point 0 and wide integer bounds, and the exact bounds follow as a float clamp.
    """
    top = 2**bits - 1
    if z == round(z) and 0 <= z <= top:
        return torch.fake_quantize_per_tensor_affine(x, s, int(z), 0, top)
    low, high = min(0, math.floor(-z) - 1), max(0, math.ceil(top - z) + 1)
    return torch.fake_quantize_per_tensor_affine(x, s, 0, low, high).clamp(-s * z, s * (top - z))


def mse_range_search(
    x: torch.Tensor, bits: int, channel_dim: int | None, percentiles: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x``, the (scale, zero point) of the percentile pair with the smallest MSE.

    Returns 1-D tensors of length ``channels`` (1 for per-tensor).
    """
    rows = _rows(x.float(), channel_dim)
    n = rows.shape[1]
    index_pairs = [
        (min(n - 1, max(0, round((1 - p) * (n - 1)))), min(n - 1, max(0, round(p * (n - 1))))) for p in percentiles
    ]
    # Only the tails are needed: top-k on each side is O(n), a full sort is not.
    k = min(n, max(max(lo_idx + 1, n - hi_idx) for lo_idx, hi_idx in index_pairs))
    smallest = rows.topk(k, dim=1, largest=False, sorted=True).values
    largest = rows.topk(k, dim=1, largest=True, sorted=True).values
    best_err = torch.full((rows.shape[0],), float("inf"), device=x.device)
    best_scale = torch.ones(rows.shape[0], device=x.device)
    best_zero = torch.zeros(rows.shape[0], device=x.device)
    for lo_idx, hi_idx in index_pairs:
        lo = smallest[:, lo_idx]
        hi = largest[:, n - 1 - hi_idx]
        scale, zero = uniform_params(lo, hi, bits)
        deq = fake_quant(rows, scale[:, None], zero[:, None], bits)
        err = (deq - rows).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


class UniformQuantizer(ActQuantizer):
    """``q = clamp(round(x/s) + z, 0, 2^b - 1)``, ``x̂ = s (q - z)``.

    ``channel_dim`` None is per tensor; otherwise one (s, z) per index along that dimension
    (-1 for post-LayerNorm activations, 0 for weights' output channels). Stage 2 of SOS turns
    a per-channel quantizer into a per-tensor one with ``set_params`` and a non-integer z̃.
    """

    def __init__(
        self, bits: int, channel_dim: int | None = None, percentiles: Sequence[float] = ACT_PERCENTILES
    ) -> None:
        super().__init__(bits)
        self.channel_dim = channel_dim
        self.percentiles = tuple(percentiles)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))

    def _broadcast_shape(self, x: torch.Tensor) -> list[int]:
        """(C,) for the last dimension, so one quantizer serves 3-D and 4-D activations alike."""
        dim = self.channel_dim % x.dim()
        if dim == x.dim() - 1:
            return [x.shape[dim]]
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        return shape

    def calibrate(self, x: torch.Tensor) -> None:
        scale, zero = mse_range_search(x, self.bits, self.channel_dim, self.percentiles)
        if self.channel_dim is None:
            self.set_params(scale[0], zero[0])
        else:
            shape = self._broadcast_shape(x)
            self.set_params(scale.reshape(shape), zero.reshape(shape))

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Replace the parameters (shape may change: per-channel to per-tensor in stage 2)."""
        self.scale = scale.detach().clone().to(self.scale.dtype)
        self.zero_point = zero_point.detach().clone().to(self.zero_point.dtype)

    @property
    def per_channel(self) -> bool:
        return self.scale.numel() > 1

    def _host_view(self) -> tuple[float, float, bool]:
        """Read once per parameter change, so no forward pass syncs with the device: per-tensor (s, z)
        as floats, and whether every zero point is an integer in [0, 2^b - 1], which the fused
        per-channel kernel requires."""
        source = getattr(self, "_host_source", None)
        versions = (self.scale._version, self.zero_point._version)
        if source is None or source[0] is not self.scale or source[1] is not self.zero_point or source[2] != versions:
            z = self.zero_point
            fusable = bool(((z == z.round()) & (z >= 0) & (z <= self.levels - 1)).all())
            if self.per_channel:
                self._host = (math.nan, math.nan, fusable)
            else:
                self._host = (float(self.scale), float(z), fusable)
                # 1/s in float32, as the fused kernel computes it, not in float64 (a float64 model, as
                # stage 2's exactness check runs, keeps float64 throughout).
                scale = self.scale if self.scale.dtype == torch.float64 else self.scale.float()
                self._host_inverse = float(1.0 / scale)
            self._host_source = (self.scale, self.zero_point, versions)
        return self._host

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s, z, fusable = self._host_view()
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self._quantize_without_grad(x, s, z, fusable)
        if not self.per_channel:
            return fused_fake_quant_per_tensor(x, s, z, self.bits)
        if fusable:
            return fused_fake_quant_per_channel(x, self.scale, self.zero_point, self.bits, self._channel_axis(x))
        return fake_quant(x, self.scale, self.zero_point, self.bits)

    def _quantize_without_grad(self, x: torch.Tensor, s: float, z: float, fusable: bool) -> torch.Tensor:
        """The fused kernels' arithmetic (``z + round(x·(1/s))``, half to even, 1/s in float32) as
        in-place tensor ops.

        Evaluation and activation capture need no straight-through mask, and on the CPU PyTorch's
        fused fake-quant kernel is several times slower than these four passes over the tensor.
        """
        top = self.levels - 1
        if not self.per_channel:
            inv = self._host_inverse
            if fusable:  # clamp(round(x/s) + z, 0, top) - z, with an integer z, is clamp(round(x/s), -z, top - z)
                return torch.mul(x, inv).round_().clamp_(-z, top - z).mul_(s)
            return torch.mul(x, inv).round_().mul_(s).clamp_(-s * z, s * (top - z))
        zero = self.zero_point
        return torch.mul(x, 1.0 / self.scale).round_().clamp_(-zero, top - zero).mul_(self.scale)

    def _channel_axis(self, x: torch.Tensor) -> int:
        return x.dim() - 1 if self.scale.dim() == 1 else self.channel_dim % x.dim()

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes exactly as the fused kernels compute them (``x * (1/s)``, half to even)."""
        return torch.clamp(torch.round(x * (1.0 / self.scale)) + self.zero_point, 0, self.levels - 1)

    def extra_repr(self) -> str:
        mode = "per-channel" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, {mode}, enabled={self.enabled}"
