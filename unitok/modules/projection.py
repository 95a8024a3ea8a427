"""Projections between the encoder width C and the quantizer latent width K*d.

``AttnProjection`` is UniTok's attention projection: a linear shortcut plus a multi-head
self-attention whose heads are averaged (C -> K*d) or concatenated (K*d -> C), followed by a
residual GeGLU MLP at the output width. Parameter names follow the official checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vitamin import GeGluMlp


class CrossWidthAttention(nn.Module):
    """Self-attention that changes the token width from ``in_dim`` to ``out_dim``.

    Down (in > out): ``num_heads`` heads of width in/num_heads attend over the tokens; their outputs
    are averaged over heads (and average-pooled to ``out_dim`` if the head width differs).
    Up (in <= out): q, k, v are projected to ``out_dim`` and the heads concatenated as usual.
    The key bias is a fixed zero buffer (as in BEiT-style attention). ``causal``: token t attends to tokens
    0..t only (the released MLLM's image input, read in generation order).
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False):
        super().__init__()
        self.in_dim, self.out_dim, self.num_heads, self.causal = in_dim, out_dim, num_heads, causal
        self.reduce = in_dim > out_dim
        width = in_dim if self.reduce else out_dim      # width of q, k and v
        if width % num_heads:
            raise ValueError(f'attention width {width} is not divisible by num_heads={num_heads}')
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(in_dim, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer('zero_k_bias', torch.zeros(width))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, hd)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)                               # (B, h, N, hd)
        if self.reduce:
            x = x.mean(dim=1)                                                                            # (B, N, hd)
            if self.head_dim != self.out_dim:
                x = F.adaptive_avg_pool1d(x, self.out_dim)                                               # (B, N, out)
        else:
            x = x.transpose(1, 2).reshape(B, N, self.out_dim)                                            # (B, N, out)
        return self.proj(x)


class AttnProjection(nn.Module):
    """``y = Linear(LN(x)) + Attn(LN(x)); y = y + GeGLU(LN(y))``, mapping (B, N, in) -> (B, N, out);
    ``causal``: causal attention (see :class:`CrossWidthAttention`)."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, mlp_ratio: float = 2.0, norm_eps: float = 1e-5,
                 causal: bool = False):
        super().__init__()
        if in_dim % out_dim and out_dim % in_dim:
            raise ValueError(f'AttnProjection needs in_dim ({in_dim}) and out_dim ({out_dim}) to divide one another')
        self.norm1 = nn.LayerNorm(in_dim, eps=norm_eps)
        self.attn = CrossWidthAttention(in_dim, out_dim, num_heads, causal)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(out_dim, eps=norm_eps)
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio), act_layer='gelu_tanh')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def build_projection(kind: str, in_dim: int, out_dim: int, num_heads: int) -> nn.Module:
    """``'attn'`` -> :class:`AttnProjection`, ``'linear'`` -> ``nn.Linear``."""
    if kind == 'attn':
        return AttnProjection(in_dim, out_dim, num_heads)
    if kind == 'linear':
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"unknown projection {kind!r}; expected 'attn' or 'linear'")
