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
from core.errors import InvalidConfigError, ModelSpecError
from core.quant_attention import QuantAttention, QuantWindowAttention, _MatmulQuantizers
from core.quant_linear import QuantConv2d, QuantLinear
from core.quantizers import SULQ, ActQuantizer, Log2Quantizer, LogSqrt2Quantizer, SelectQuantizer, UniformQuantizer
from core.swin_padding import pad_with_pad_value

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


def unit_of(name: str, units: list[str]) -> str | None:
    """The unit (``find_units``) that module ``name`` belongs to, or None."""
    best = None
    for unit in units:
        if (name == unit or name.startswith(unit + ".")) and (best is None or len(unit) > len(best)):
            best = unit
    return best


def wrap_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace attention, Linear and patch-embed conv modules in place; return the model.

    Each quantizer gets its unit's bits (``config.unit_bits``): mixed precision is the same structure
    with other widths, so ``core.load`` rebuilds it from the stored config.
    """
    _check_supported(model)
    config = config.resolved()
    units = find_units(model)
    unknown = sorted(set(config.per_unit_bits or {}) - set(units))
    if unknown:
        raise InvalidConfigError(
            f"per_unit_bits names {', '.join(map(repr, unknown[:3]))}, which this model does not have; "
            f"its units are {', '.join(units[:4])}, …, {units[-1]}"
        )
    channel_wise = config.method in (Method.ISVIT, Method.REPQ)
    post_ln = _post_ln_linears(model) if channel_wise else set()

    def bits(path: str) -> tuple[int, int]:
        return config.unit_bits(unit_of(path, units))

    def act(a_bits: int, channel: bool = False) -> UniformQuantizer:
        return UniformQuantizer(a_bits, channel_dim=-1 if channel else None)

    def quant_linear(linear: nn.Linear, path: str) -> QuantLinear:
        w_bits, a_bits = bits(path)
        return QuantLinear.from_float(linear, w_bits, act(a_bits, id(linear) in post_ln))

    def child_path(parent_name: str, name: str) -> str:
        return f"{parent_name}.{name}" if parent_name else name

    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, Attention | WindowAttention):
                path = child_path(parent_name, name)
                a_bits = bits(path)[1]
                quantizers = _MatmulQuantizers(
                    act(a_bits), act(a_bits),
                    softmax_quantizer(config.softmax_quantizer, a_bits, config.integer_exponent), act(a_bits),
                )
                cls = QuantAttention if isinstance(child, Attention) else QuantWindowAttention
                try:
                    new = cls(child, quant_linear(child.qkv, path + ".qkv"), quant_linear(child.proj, path + ".proj"),
                              quantizers)
                except ValueError as exc:
                    raise ModelSpecError(f"{name}: {exc}") from None
                replacements.append((parent, name, new))
    for parent, name, new in replacements:
        setattr(parent, name, new)
    for module in model.modules():
        if isinstance(module, SwinTransformerBlock):
            pad_with_pad_value(module)  # exact window padding after stage 2 (core/swin_padding.py)

    replacements = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, QuantAttention | QuantWindowAttention):
            continue
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                replacements.append((parent, name, quant_linear(child, child_path(parent_name, name))))
    for parent, name, new in replacements:
        setattr(parent, name, new)

    proj = model.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        raise ModelSpecError(f"patch embedding {type(proj).__name__} is not a Conv2d")
    model.patch_embed.proj = QuantConv2d(proj, bits("patch_embed.proj")[0])
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
    """Reconstruction units in forward order: patch embed, blocks/patch-merging, loose Linears.

    The same names before and after ``wrap_model`` (a loose ``nn.Linear`` becomes a ``QuantLinear``)."""
    units = ["patch_embed"]
    covered = ["patch_embed."]
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        if isinstance(module, UNIT_TYPES) or (isinstance(module, QuantLinear | nn.Linear) and name):
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
