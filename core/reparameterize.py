"""SOS stage 2: turn channel-wise post-LayerNorm quantizers into layer-wise ones, losslessly.

For a per-channel quantizer (s, z) between LayerNorm (γ, β) and Linear (W, b):
``s̃ = mean(s)``, ``z̃ = round(mean(z))``, ``r = s/s̃``, ``β_off = (-z·s)/r - (-z̃·s̃)``;
``γ ← γ/r``, ``β ← β/r - β_off``; ``W[:, j] ← W[:, j]·r_j``, ``b ← b + W_new β_off``.
The paper (and the authors' code) keep ``z̃ = mean(z)``, which is not an integer, so with the
activation quantizers on the codes move and stage 2 changes the logits (0.148 relative change on
the bundled model at W4A4). vitq rounds ``z̃`` to an integer and folds the rest the same way:
then ``x'/s̃ = x/s_c + (z_c - z̃)`` holds with an integer offset, ``round(x'/s̃) + z̃`` is exactly
``round(x/s_c) + z_c``, the codes are the channel-wise ones, and the Linear's folded bias cancels
the dequantized offset, so stage 2 is lossless with the quantizers on as well.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from core.quant_attention import QuantWindowAttention
from core.quant_linear import QuantLinear
from core.wrap import find_ln_pairs


@torch.no_grad()
def reparameterize_pair(ln: nn.LayerNorm, linear: QuantLinear) -> torch.Tensor:
    """Fold one pair; returns ``β_off``: the LayerNorm's output is ``x/r − β_off`` from now on."""
    quantizer = linear.input_quantizer
    s = quantizer.scale.reshape(-1).to(linear.weight.dtype)
    z = quantizer.zero_point.reshape(-1).to(linear.weight.dtype)
    s_mean, z_mean = s.mean(), z.mean().round()
    r = s / s_mean
    beta_off = (-z * s) / r - (-z_mean * s_mean)
    ln.weight.div_(r)
    ln.bias.div_(r).sub_(beta_off)
    linear.weight.mul_(r[None, :])
    extra = linear.weight @ beta_off
    if linear.bias is None:
        linear.bias = nn.Parameter(extra)
    else:
        linear.bias.add_(extra)
    quantizer.set_params(s_mean, z_mean)
    quantizer.channel_dim = None
    return beta_off


def reparameterize(model: nn.Module) -> int:
    """Apply stage 2 to every channel-wise post-LN quantizer; returns how many were changed.

    A Swin block pads its attention input after ``norm1``: the original zero is ``−β_off`` in the
    folded space, so that becomes the block's pad value (``core/swin_padding.py``)."""
    window_attention = {
        id(m.attn.qkv): m.attn
        for m in model.modules()
        if isinstance(m, SwinTransformerBlock) and isinstance(m.attn, QuantWindowAttention)
    }
    pairs = find_ln_pairs(model)
    for ln, linear in pairs:
        beta_off = reparameterize_pair(ln, linear)
        attn = window_attention.get(id(linear))
        if attn is not None:
            attn.pad_value.copy_(-beta_off)
    return len(pairs)
