"""Turn a timm ViT/DeiT/Swin into the quantizable model every method works on.

Attention modules become ``QuantAttention``/``QuantWindowAttention`` (explicit matmuls), every
``nn.Linear`` a ``QuantLinear``, the patch-embedding conv a ``QuantConv2d``. All quantizers start
disabled, so the wrapped model computes exactly what the original did. The structure is a pure
function of (architecture, config), which is what lets ``core.load`` rebuild it.
"""

from __future__ import annotations

from collections.abc import Iterator

from timm.layers import Attention
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from core.config import Method, QuantConfig, SoftmaxQuantizer
from core.errors import ModelSpecError
from core.quant_attention import QuantAttention, QuantWindowAttention, _MatmulQuantizers
from core.quant_linear import QuantConv2d, QuantLinear
from core.quantizers import SULQ, ActQuantizer, Log2Quantizer, LogSqrt2Quantizer, SelectQuantizer, UniformQuantizer

UNIT_TYPES = (Block, SwinTransformerBlock, PatchMerging)
"""Modules reconstructed as one unit by SOS; the patch embedding and loose Linears are units too."""

_POST_LN_PAIRS = {
    Block: (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")),
    SwinTransformerBlock: (("norm1", "attn.qkv"), ("norm2", "mlp.fc1")),
    PatchMerging: (("norm", "reduction"),),
}


def softmax_quantizer(kind: SoftmaxQuantizer, bits: int, integer_exponent: bool) -> ActQuantizer:
    if kind == SoftmaxQuantizer.SULQ_OR_LOGSQRT2:
        return SelectQuantizer([SULQ(bits, integer_exponent=integer_exponent), LogSqrt2Quantizer(bits)])
    if kind == SoftmaxQuantizer.SULQ:
        return SULQ(bits, integer_exponent=integer_exponent)
    if kind == SoftmaxQuantizer.LOG2:
        return Log2Quantizer(bits)
    if kind == SoftmaxQuantizer.LOGSQRT2:
        return LogSqrt2Quantizer(bits)
    return UniformQuantizer(bits)


def _check_supported(model: nn.Module) -> None:
    if isinstance(model, VisionTransformer):
        for i, block in enumerate(model.blocks):
            if type(block) is not Block or not isinstance(block.attn, Attention):
                raise ModelSpecError(
                    f"block {i} is a {type(block).__name__}; vitq supports ViT/DeiT with standard "
                    "pre-norm blocks and Swin (v1)"
                )
        return
    if isinstance(model, SwinTransformer):
        return
    raise ModelSpecError(
        f"{type(model).__name__} is not supported: vitq quantizes timm VisionTransformer (ViT, DeiT) "
        "and SwinTransformer models"
    )


def _post_ln_linears(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        for ln_name, linear_name in _POST_LN_PAIRS.get(type(module), ()):
            ln = module.get_submodule(ln_name)
            if isinstance(ln, nn.LayerNorm) and ln.elementwise_affine:
                ids.add(id(module.get_submodule(linear_name)))
    return ids


def wrap_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace attention, Linear and patch-embed conv modules in place; return the model."""
    _check_supported(model)
    config = config.resolved()
    channel_wise = config.method in (Method.ISVIT, Method.REPQ)
    post_ln = _post_ln_linears(model) if channel_wise else set()
    a_bits, w_bits = config.a_bits, config.w_bits

    def act(channel: bool = False) -> UniformQuantizer:
        return UniformQuantizer(a_bits, channel_dim=-1 if channel else None)

    def quant_linear(linear: nn.Linear) -> QuantLinear:
        return QuantLinear.from_float(linear, w_bits, act(id(linear) in post_ln))

    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Attention | WindowAttention):
                quantizers = _MatmulQuantizers(
                    act(), act(), softmax_quantizer(config.softmax_quantizer, a_bits, config.integer_exponent), act()
                )
                cls = QuantAttention if isinstance(child, Attention) else QuantWindowAttention
                try:
                    new = cls(child, quant_linear(child.qkv), quant_linear(child.proj), quantizers)
                except ValueError as exc:
                    raise ModelSpecError(f"{name}: {exc}") from None
                replacements.append((parent, name, new))
    for parent, name, new in replacements:
        setattr(parent, name, new)

    replacements = []
    for parent in model.modules():
        if isinstance(parent, QuantAttention | QuantWindowAttention):
            continue
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                replacements.append((parent, name, quant_linear(child)))
    for parent, name, new in replacements:
        setattr(parent, name, new)

    proj = model.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        raise ModelSpecError(f"patch embedding {type(proj).__name__} is not a Conv2d")
    model.patch_embed.proj = QuantConv2d(proj, w_bits)
    model.eval()
    return model


def quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    """Every activation quantizer (weight quantizers, and the candidates inside a ``SelectQuantizer``,
    excluded)."""
    for name, module in model.named_modules():
        if isinstance(module, ActQuantizer) and not name.endswith("weight_quantizer") and ".candidates." not in name:
            yield name, module


def weight_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear | QuantConv2d]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear | QuantConv2d):
            yield name, module


def set_quant_state(model: nn.Module, *, weights: bool, activations: bool) -> None:
    for _, layer in weight_layers(model):
        layer.weight_quantizer.enabled = weights
    for _, quantizer in quantizers(model):
        quantizer.enabled = activations


def find_units(model: nn.Module) -> list[str]:
    """Reconstruction units in forward order: patch embed, blocks/patch-merging, loose Linears."""
    units = ["patch_embed"]
    covered = ["patch_embed."]
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        if isinstance(module, UNIT_TYPES) or (isinstance(module, QuantLinear) and name):
            units.append(name)
            covered.append(name + ".")
    return units


def find_ln_pairs(model: nn.Module) -> list[tuple[nn.LayerNorm, QuantLinear]]:
    """(LayerNorm, the Linear it feeds) for every post-LN quantizer that is channel-wise."""
    pairs = []
    for module in model.modules():
        for ln_name, linear_name in _POST_LN_PAIRS.get(type(module), ()):
            ln, linear = module.get_submodule(ln_name), module.get_submodule(linear_name)
            quantizer = getattr(linear, "input_quantizer", None)
            if isinstance(quantizer, UniformQuantizer) and quantizer.channel_dim is not None:
                pairs.append((ln, linear))
    return pairs
