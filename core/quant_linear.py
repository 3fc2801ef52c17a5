"""Quantized Linear and Conv2d: per-output-channel weight quantizer plus an input quantizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.quantizers import ActQuantizer, UniformQuantizer
from core.quantizers.uniform import WEIGHT_PERCENTILES


def _weight_quantizer(bits: int) -> UniformQuantizer:
    return UniformQuantizer(bits, channel_dim=0, percentiles=WEIGHT_PERCENTILES)


class QuantLinear(nn.Module):
    """``F.linear(quant_in(x), quant_w(W), b)``.

    ``input_quantizer`` is None where the paper leaves the input in float. Swapped in with
    ``from_float`` rather than by patching ``forward`` on a live module.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, w_bits: int, input_quantizer: ActQuantizer | None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.input_quantizer = input_quantizer
        self.weight_quantizer = _weight_quantizer(w_bits)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, input_quantizer: ActQuantizer | None) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w_bits, input_quantizer)
        q.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q

    def init_weight_quantizer(self) -> None:
        with torch.no_grad():
            self.weight_quantizer.calibrate(self.weight.detach())
        self.weight_quantizer.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantConv2d(nn.Module):
    """Patch-embedding convolution: weights quantized per output channel; the image is not."""

    def __init__(self, conv: nn.Conv2d, w_bits: int) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if isinstance(self.padding, str):
            raise ValueError("string padding is not supported for the patch embedding")
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.weight_quantizer = _weight_quantizer(w_bits)
        self.input_quantizer = None

    init_weight_quantizer = QuantLinear.init_weight_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_quantizer(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
