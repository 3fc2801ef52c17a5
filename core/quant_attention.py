"""Attention with explicit, quantizable matmuls, replacing timm's (possibly fused) attention.

Only explicit ``q @ kᵀ`` and ``attn @ v`` expose their inputs to quantizers, so the wrapper owns
the choice timm makes with ``fused_attn``. Swin's relative-position bias and shift masks are
applied exactly as timm applies them.
"""

from __future__ import annotations

import torch
from torch import nn

from core.quant_linear import QuantLinear
from core.quantizers import ActQuantizer


class _MatmulQuantizers(nn.Module):
    """The four matmul-input quantizers: q and k (uniform), post-Softmax A, and v (uniform)."""

    def __init__(self, q: ActQuantizer, k: ActQuantizer, attn: ActQuantizer, v: ActQuantizer) -> None:
        super().__init__()
        self.q_quantizer, self.k_quantizer, self.attn_quantizer, self.v_quantizer = q, k, attn, v


class QuantAttention(nn.Module):
    """timm ``Attention`` (ViT, DeiT) with quantized qkv/proj and matmul inputs."""

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, quantizers: _MatmulQuantizers):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated attention is not supported")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv, self.proj = qkv, proj
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, getattr(attn, "norm", nn.Identity())
        self.matmul = quantizers

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        m = self.matmul
        attn = m.q_quantizer(q * self.scale) @ m.k_quantizer(k).transpose(-2, -1)
        if is_causal:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1)
            attn = attn.masked_fill(causal, float("-inf"))
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        attn = attn.softmax(dim=-1)
        x = m.attn_quantizer(attn) @ m.v_quantizer(v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(self.norm(x))


class QuantWindowAttention(nn.Module):
    """timm Swin ``WindowAttention`` with quantized qkv/proj and matmul inputs.

    The relative-position bias table stays a trainable parameter (SOS trains it with the block).
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, quantizers: _MatmulQuantizers):
        super().__init__()
        self.num_heads, self.scale, self.window_area = attn.num_heads, attn.scale, attn.window_area
        self.window_size = getattr(attn, "window_size", None)
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv, self.proj = qkv, proj
        self.matmul = quantizers
        # What the block pads windows with, in this module's input space (core/swin_padding.py): zero,
        # until SOS stage 2 folds the post-LN quantizer and it becomes the folded image of zero.
        self.register_buffer("pad_value", torch.zeros(qkv.in_features, dtype=qkv.weight.dtype))
        self.offset_input = False  # set by the block while it passes x − pad_value: add it back first

    def _rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous()
        return bias.unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        if self.offset_input:
            x = x + self.pad_value
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        m = self.matmul
        attn = m.q_quantizer(q * self.scale) @ m.k_quantizer(k).transpose(-2, -1)
        attn = attn + self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        x = m.attn_quantizer(attn) @ m.v_quantizer(v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)
