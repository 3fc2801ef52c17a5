"""Export-time stand-ins for the fake-quant modules: each ``forward`` emits exactly the ops the ONNX
file carries, and computes what the fake-quant module computes in evaluation.

``to_export_modules`` swaps them into a copy of the model before ``torch.onnx.export`` traces it:

- weights: integer codes with per-channel scale and zero point, ``DequantizeLinear`` (axis = output
  channel), feeding ``MatMul`` (codes stored transposed, in × out) or ``Conv``;
- uniform activation quantizers: a ``QuantizeLinear``/``DequantizeLinear`` pair at 8 bits (integer
  zero point in [0, 255]), else the fake-quant subgraph PyTorch evaluates:
  ``Mul(1/s) → Round → Add(z) → Clip(0, 2^b−1) → Sub(z) → Mul(s)`` (a non-integer or out-of-range
  zero point: ``Mul(1/s) → Round → Mul(s) → Clip(−s·z, s·(2^b−1−z))``);
- SULQ, log2 and log√2: ``Log`` and ``Round``/``Clip`` compute the code, and a ``Gather`` from the
  2^b dequantized values (computed here with PyTorch's own arithmetic) turns it into the output, which
  is the same value ``2^(−e) − η`` the formula gives and the lookup a shift-based kernel would do.

Rounding: ``torch.round``, ONNX ``Round`` and ``QuantizeLinear`` all round half to even. PyTorch's
quantizers multiply by ``1/s`` (float32) where ``QuantizeLinear`` divides by ``s``; ONNX has no
``Log2``, so the log quantizers use ``Log(x)·(1/ln 2)``. Both can move a value lying within one ulp of
a rounding boundary to the next code; everything else is bit-for-bit PyTorch's arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.quant_linear import QuantConv2d, QuantLinear
from core.quantizers import SULQ, ActQuantizer, Log2Quantizer, LogSqrt2Quantizer, SelectQuantizer, UniformQuantizer

_INV_LN2 = 1.0 / math.log(2.0)
_TINY = 1e-20


class _QuantDequant(torch.autograd.Function):
    """``DequantizeLinear(QuantizeLinear(x, s, z), s, z)``, uint8, per tensor.

    uint8 also for the right-hand operand of ``q @ kᵀ``: on x86 ONNX Runtime turns int8 QDQ pairs
    back into uint8 (``QDQS8ToU8Transformer``), and with the pair in front of a Transpose that
    rewrite fails to load (ORT 1.32), so int8 activations would gain nothing and cost the file.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, zero_point: int, inverse: float) -> torch.Tensor:
        return torch.mul(x, inverse).round_().clamp_(-zero_point, 255 - zero_point).mul_(scale)

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int, inverse: float):
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        q = g.op("QuantizeLinear", x, s, z)
        return g.op("DequantizeLinear", q, s, z)


class _Dequantize(torch.autograd.Function):
    """``DequantizeLinear(codes, scale, zero_point, axis)``: ``(codes − z)·s`` per channel."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * codes.dim()
        shape[axis] = -1
        return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis: int):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


SIGNED_SHIFT = 128
"""5- to 8-bit weight codes and zero points are stored minus 128, as int8: ``(codes − z)·s`` is unchanged,
and ONNX Runtime then runs the fused GEMM on MLAS's u8 (activation) × s8 (weight) kernel, which is
faster than its u8 × u8 one (measured on the bundled ViT at W8A8, 2 threads, AVX-512 VNNI CPU: 0.70×
instead of 1.06× the FP32 file's latency at batch 1; docs/export.md)."""


class _QuantizeAndLookUp(torch.autograd.Function):
    """``Gather(values, Cast(QuantizeLinear(t, s, z), int32))``: the codes ``Clip(Round(t / s) + z, 0, 255)``
    in one pass instead of four (the division, round half to even and saturation, as the formula
    does), then the lookup of the dequantized values."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, values: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        # (no ``/ 1`` or ``+ 0``: the exporter's peephole pass drops them inside a traced Function and fails)
        codes = torch.round(t / scale if scale != 1.0 else t)
        codes = torch.clamp(codes + zero_point if zero_point else codes, 0, 255).to(torch.int64)
        return values[codes]

    @staticmethod
    def symbolic(g, t, values, scale: float, zero_point: int):
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        codes = g.op("Cast", g.op("QuantizeLinear", t, s, z), to_i=6)  # 6: INT32
        return g.op("Gather", values, codes, axis_i=0)


def _code_dtype(zero_point: torch.Tensor, bits: int) -> torch.dtype:
    """The narrowest integer type holding both the codes [0, 2^b) and the zero points.

    uint8 at 4 bits and below (repacked as uint4 after export); int8, codes shifted by −128
    (``SIGNED_SHIFT``), at 5 to 8 bits. A channel whose range does not contain 0 has a zero point
    outside the code range, and then a wider or signed type holds both, unshifted.
    """
    low, high = float(zero_point.min()), float(zero_point.max())
    if low >= 0 and high <= 255:
        return torch.uint8 if bits <= 4 else torch.int8
    if low >= -128 and high <= 127 and bits <= 7:
        return torch.int8
    return torch.int16


class _QuantizedWeight(nn.Module):
    """Integer codes, scale and zero point of one weight; ``forward`` returns the dequantized weight."""

    def __init__(self, layer: QuantLinear | QuantConv2d, transpose: bool) -> None:
        super().__init__()
        wq = layer.weight_quantizer
        with torch.no_grad():
            codes = wq.codes(layer.weight.detach().float())
        zero = wq.zero_point.detach().reshape(-1).float()
        if not torch.equal(zero, zero.round()):
            raise ValueError("weight zero points must be integers")
        dtype = _code_dtype(zero, wq.bits)
        low, high = float(zero.min()), float(zero.max())
        if dtype == torch.int8 and low >= 0 and high <= 255:  # the shifted uint8 codes
            codes, zero = codes - SIGNED_SHIFT, zero - SIGNED_SHIFT
        if transpose:
            codes = codes.t()
        self.bits = wq.bits
        self.axis = 1 if transpose else 0
        self.register_buffer("codes", codes.contiguous().to(dtype))
        self.register_buffer("scale", wq.scale.detach().reshape(-1).float().clone())
        self.register_buffer("zero_point", zero.to(dtype))

    def forward(self) -> torch.Tensor:
        return _Dequantize.apply(self.codes, self.scale, self.zero_point, self.axis)


class ExportLinear(nn.Module):
    """``MatMul(input_quantizer(x), DequantizeLinear(codesᵀ)) + b``."""

    def __init__(self, layer: QuantLinear, input_quantizer: nn.Module | None) -> None:
        super().__init__()
        self.input_quantizer = input_quantizer
        if layer.weight_quantizer.enabled:
            self.weight = _QuantizedWeight(layer, transpose=True)
        else:
            self.register_buffer("weight_t", layer.weight.detach().float().t().contiguous())
            self.weight = None
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = torch.matmul(x, self.weight() if self.weight is not None else self.weight_t)
        return y if self.bias is None else y + self.bias


class ExportConv2d(nn.Module):
    """``Conv(x, DequantizeLinear(codes), b)``: the patch embedding (its input, the image, stays float)."""

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__()
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        if layer.weight_quantizer.enabled:
            self.weight = _QuantizedWeight(layer, transpose=False)
        else:
            self.register_buffer("weight_float", layer.weight.detach().float().clone())
            self.weight = None
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight() if self.weight is not None else self.weight_float
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ExportUniform(nn.Module):
    """A uniform activation quantizer, per tensor: QDQ at 8 bits, else the exact fake-quant subgraph."""

    def __init__(self, quantizer: UniformQuantizer) -> None:
        super().__init__()
        self.bits = quantizer.bits
        self.top = 2**quantizer.bits - 1
        self.scale = float(quantizer.scale)
        self.zero_point = float(quantizer.zero_point)
        # 1/s in float32, as UniformQuantizer computes it.
        self.inverse = float(1.0 / quantizer.scale.float())
        z = self.zero_point
        self.integer_zero = z == round(z) and 0 <= z <= self.top

    @property
    def kind(self) -> str:
        if self.integer_zero and self.bits == 8:
            return "qdq"
        return "fake-quant" if self.integer_zero else "fake-quant-clamped"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z, top = self.scale, self.zero_point, self.top
        if self.integer_zero and self.bits == 8:
            return _QuantDequant.apply(x, s, int(z), self.inverse)
        q = torch.round(x * self.inverse)
        if self.integer_zero:
            return (torch.clamp(q + z, 0, top) - z) * s
        return torch.clamp(q * s, -s * z, s * (top - z))


class ExportUniformPerChannel(nn.Module):
    """A channel-wise uniform activation quantizer (never left after SOS stage 2): the subgraph with
    tensor bounds, ``Min(Max(Round(x·(1/s)), −z), 2^b−1−z)·s``."""

    def __init__(self, quantizer: UniformQuantizer) -> None:
        super().__init__()
        scale, zero = quantizer.scale.detach().float(), quantizer.zero_point.detach().float()
        top = 2**quantizer.bits - 1
        self.register_buffer("inverse", 1.0 / scale)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("low", -zero)
        self.register_buffer("high", top - zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x * self.inverse)
        return torch.minimum(torch.maximum(q, self.low), self.high) * self.scale


class _LogCodeLookup(nn.Module):
    """Shared tail of the log quantizers: float codes → Cast(int32) → Gather(dequantized values).

    int32 indices, not int64: ONNX Runtime's Gather over an attention map is about a quarter faster
    with them (measured: 13.1 vs 17.3 ms for a 64×3×50×50 map, 2 threads)."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("values", values.float().contiguous())

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.values[codes.to(torch.int32)]


class ExportSULQ(_LogCodeLookup):
    """``q = Clip(Round(−log2(max(x, 0) + η) / s) + z, 0, 2^b−1)``, ``x̂ = values[q]`` with
    ``values[k] = 2^(−round(s·(k − z))) − η`` (or without the round, per ``integer_exponent``)."""

    def __init__(self, quantizer: SULQ) -> None:
        eta, scale, zero = (quantizer.eta.detach().float(), quantizer.scale.detach().float(),
                            quantizer.zero_point.detach().float())
        codes = torch.arange(quantizer.levels, dtype=torch.float32)
        exponent = scale * (codes - zero)
        if quantizer.integer_exponent:
            exponent = torch.round(exponent)
        super().__init__(torch.exp2(-exponent) - eta)
        self.eta, self.scale, self.zero_point, self.top = float(eta), float(scale), float(zero), quantizer.levels - 1
        # 8 bits with an integer zero point in [0, 255]: the code is exactly a uint8 QuantizeLinear of t
        z = self.zero_point
        self.quantize_linear = self.top == 255 and z == round(z) and 0 <= z <= 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.log(torch.clamp(x, min=0) + self.eta) * -_INV_LN2
        if self.quantize_linear:
            return _QuantizeAndLookUp.apply(t, self.values, self.scale, int(self.zero_point))
        q = torch.clamp(torch.round(t / self.scale) + self.zero_point, 0, self.top)
        return self.lookup(q)


class ExportLog2(_LogCodeLookup):
    """``q = Clip(Round(−log2(max(x, 1e-20))), 0, 2^b−1)``, ``x̂ = values[q] = 2^−q``."""

    def __init__(self, quantizer: Log2Quantizer) -> None:
        super().__init__(torch.exp2(-torch.arange(quantizer.levels, dtype=torch.float32)))
        self.top = quantizer.levels - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(torch.log(torch.clamp(x, min=_TINY)) * -_INV_LN2), 0, self.top)
        return self.lookup(q)


class ExportLogSqrt2(_LogCodeLookup):
    """``q = Clip(Round(−2·log2(max(x/s, 1e-20))), 0, 2^b)``, ``x̂ = values[q]``: ``s·2^(−q/2)``, and
    0 for ``q = 2^b`` (every code at or beyond 2^b goes to 0, as in RepQ-ViT)."""

    def __init__(self, quantizer: LogSqrt2Quantizer) -> None:
        scale = quantizer.scale.detach().float()
        codes = torch.arange(quantizer.levels, dtype=torch.float32)
        super().__init__(torch.cat([scale * torch.exp2(-codes / 2), torch.zeros(1)]))
        self.scale, self.levels = float(scale), quantizer.levels
        # The largest code the clamp to 1e-20 lets through is round(−2·log2(1e-20)) = 133. With 2^b ≥ 255
        # (8 bits) the upper clip never binds, so Round → Clip(0, 2^b) is a uint8 QuantizeLinear (scale 1).
        self.quantize_linear = self.levels >= 255 and round(-2 * math.log2(_TINY)) <= 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(x / self.scale, min=_TINY)
        t = torch.log(y) * (-2 * _INV_LN2)
        if self.quantize_linear:
            return _QuantizeAndLookUp.apply(t, self.values, 1.0, 0)
        q = torch.clamp(torch.round(t), 0, self.levels)
        return self.lookup(q)


def export_quantizer(quantizer: ActQuantizer | None) -> nn.Module | None:
    """The export module for an activation quantizer; None (identity) where it is off or absent."""
    if quantizer is None or not quantizer.enabled:
        return None
    if isinstance(quantizer, SelectQuantizer):  # the candidate that calibration chose for this layer
        quantizer = quantizer.chosen
    if isinstance(quantizer, UniformQuantizer):
        return ExportUniformPerChannel(quantizer) if quantizer.per_channel else ExportUniform(quantizer)
    if isinstance(quantizer, SULQ):
        return ExportSULQ(quantizer)
    if isinstance(quantizer, LogSqrt2Quantizer):
        return ExportLogSqrt2(quantizer)
    if isinstance(quantizer, Log2Quantizer):
        return ExportLog2(quantizer)
    raise TypeError(f"no ONNX form for {type(quantizer).__name__}")


def to_export_modules(model: nn.Module) -> nn.Module:
    """Swap every fake-quant module of ``model`` (a copy: this mutates it) for its export module."""
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, QuantLinear):
                replacements.append((parent, name, ExportLinear(child, export_quantizer(child.input_quantizer))))
            elif isinstance(child, QuantConv2d):
                replacements.append((parent, name, ExportConv2d(child)))
            elif isinstance(child, ActQuantizer):
                replacements.append((parent, name, export_quantizer(child) or nn.Identity()))
    for parent, name, new in replacements:
        setattr(parent, name, new)
    return model
