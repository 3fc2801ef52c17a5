"""Swin's window padding, made exact in SOS stage 2's folded space.

timm pads a block's attention input to whole windows with zeros, after the block's LayerNorm. Stage 2
folds the channel-wise post-LN quantizer into that LayerNorm and the qkv Linear (``core.reparameterize``):
a real token's LayerNorm output becomes ``x' = x/r − β_off``, so the original zero is ``−β_off`` there,
and a zero padded into the folded space reaches qkv as ``β_off`` too much. The padded positions are keys
and values of the real tokens in their window, so the logits moved (29 % relative change on a test Swin
at W3A3, 5 % even with the quantizers off). The block therefore pads with ``pad_value``, the folded image of
zero (0 before stage 2): it hands timm ``x' − pad_value``, whose zero padding is then exact, and the
attention adds ``pad_value`` back before qkv. Feature maps of whole windows are not touched.
"""

from __future__ import annotations

import types

import torch
from timm.models.swin_transformer import SwinTransformerBlock

from core.quant_attention import QuantWindowAttention


def _attn_padding_with_pad_value(self: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    height, width = x.shape[1], x.shape[2]
    if height % self.window_size[0] == 0 and width % self.window_size[1] == 0:
        return SwinTransformerBlock._attn(self, x)
    attn: QuantWindowAttention = self.attn
    attn.offset_input = True
    try:
        return SwinTransformerBlock._attn(self, x - attn.pad_value)
    finally:
        attn.offset_input = False


def pad_with_pad_value(block: SwinTransformerBlock) -> None:
    """Make ``block`` pad its attention input with ``block.attn.pad_value`` instead of zeros."""
    if not isinstance(block.attn, QuantWindowAttention):
        raise TypeError("the block's attention must be wrapped (QuantWindowAttention) first")
    block._attn = types.MethodType(_attn_padding_with_pad_value, block)
