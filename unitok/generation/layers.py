"""Transformer layers of the generator: RMSNorm, SwiGLU, 2-D rotary positions, attention with an
optional static KV cache, and the pre-norm block.

Conventions: activations are NLC ``(B, T, C)``; attention works on ``(B, heads, T, head_dim)``.
Boolean attention masks are True where a query may attend to a key.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32 (at least) whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)         # one fused op, same numbers
        compute = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(compute), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, bias-free, with dropout on the output."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


# ---------------------------------------------------------------------- 2-D rotary positions
def rope_2d(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, base: float = 10000.0,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for tokens at grid positions ``(rows[i], cols[i])``.

    Each head has ``head_dim / 2`` rotation pairs (adjacent channels ``2j, 2j+1``). The first half of
    the pairs rotates with the row index, the second half with the column index, both with the
    frequencies ``base ** (-i / (head_dim / 4))``, i = 0 .. head_dim/4 - 1.

    Returns:
        ``(cos, sin)``, each ``(T, head_dim / 2)`` in ``dtype``.
    """
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64, device=rows.device) / quarter)
    angles = torch.cat([rows.double()[:, None] * freqs, cols.double()[:, None] * freqs], dim=1)  # (T, head_dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` ``(B, heads, T, head_dim)`` by the tables ``(T, head_dim / 2)``.

    Computed in at least float32; returns ``x``'s dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(compute).unflatten(-1, (-1, 2))                    # (B, nh, T, hd/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(compute), sin.to(compute)
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)  # (B, nh, T, hd/2, 2)
    return out.flatten(-2).type_as(x)                                 # (B, nh, T, hd)


# ---------------------------------------------------------------------- static KV cache
class KVCache:
    """Keys and values of one attention layer for ``max_len`` positions, preallocated once.

    ``k`` and ``v`` are ``(B, heads, max_len, head_dim)``; :meth:`update` writes new positions in place
    and returns views of everything written so far.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.k = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` ``(B, heads, T, head_dim)`` at positions ``start .. start+T-1``; return the
        cached keys and values of positions ``0 .. start+T-1``."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f'KV cache holds {self.max_len} positions, cannot write up to position {end}')
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# ---------------------------------------------------------------------- attention and block
class Attention(nn.Module):
    """Multi-head self-attention (``F.scaled_dot_product_attention``), fused bias-free qkv projection.

    Without a cache it is causal unless ``mask`` is given. With a cache the new tokens attend to every
    cached position and to each other as ``mask`` says (None: to all of them, fine for one new token).
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """x: ``(B, T, C)``; rope: tables ``(T, head_dim/2)``; mask: bool, broadcastable to
        ``(B, heads, T, keys)``; cache/start: write the new keys/values at ``start`` and attend to the cache."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, nh, T, hd)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(start, k, v)                          # (B, nh, start+T, hd)
        causal = mask is None and cache is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, T, C)                    # (B, T, C)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + swiglu(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, norm_eps: float = 1e-5, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, num_heads, attn_drop, drop)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = SwiGLU(dim, ffn_dim, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope=None, mask=None, cache: KVCache | None = None, start: int = 0):
        x = x + self.drop_path(self.attn(self.attn_norm(x), rope, mask, cache, start))
        return x + self.drop_path(self.ffn(self.ffn_norm(x)))
