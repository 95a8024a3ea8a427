"""Pixel decoder: ViTamin transformer blocks on the token grid, then four 2x up-sampling conv
stages back to RGB (the mirror image of the ViTamin conv stem and MbConv stages).

Parameter names follow the official UniTok checkpoint (``blocks``, ``norm``, ``up_conv1..4``).
Unlike the official decoder, the grid shape ``(h, w)`` is an explicit argument, so non-square
images decode correctly.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerNorm2d, LayerNormAct2d, make_divisible
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from timm.models.vitamin import GeGluMlp
from torch.utils.checkpoint import checkpoint


# For a nearest-2x-upsampled input, the 3x3 window of output phase a (even/odd row) hits the low-res
# rows (i-1, i) [a=0] or (i, i+1) [a=1]; these matrices sum the kernel rows (and columns) falling on each.
_PHASE_TAPS = ((1., 0., 0.), (0., 1., 1.)), ((1., 1., 0.), (0., 0., 1.))


class Upsample2d(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 conv (padding 1).

    Computed without materialising the up-sampled tensor: each of the four output phases is a 2x2
    conv of the low-res input with summed kernel taps. Same function and parameters, 2.25x fewer
    multiply-adds (results equal up to float rounding).

    In reduced-precision inference (bf16/fp16 weights, autograd off: the fast path) the phase kernels
    are computed once per version of the weight and kept (their computation from a 1280 x 1280 x 3 x 3
    weight was a fifth of a bf16 decode at batch 1). An in-place edit through ``weight.data`` bypasses
    the version counter and is not seen; ``load_state_dict``, ``copy_`` and optimizer steps are.
    """

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, kernel_size=3, padding=1)
        self._kernels: tuple[tuple, torch.Tensor] | None = None     # (weight key, phase kernels)

    def phase_kernels(self) -> torch.Tensor:
        """(2, 2, O, C, 2, 2): the kernel of output phase (a, b) over the low-res input."""
        w = self.conv.weight
        if (w.dtype not in (torch.bfloat16, torch.float16) or torch.is_grad_enabled()
                or torch.compiler.is_compiling()):
            return _phase_kernels(w)
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._kernels is None or self._kernels[0] != key:
            self._kernels = (key, _phase_kernels(w))
        return self._kernels[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        kernels = self.phase_kernels()
        out = None
        for a in range(2):
            for b in range(2):
                y = F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), kernels[a, b], self.conv.bias)  # (B, O, H, W)
                if out is None:   # (B, H, 2, W, 2, O) storage viewed as channels-last (B, O, 2H, 2W)
                    out = y.new_empty(B, H, 2, W, 2, y.shape[1])
                out[:, :, a, :, b] = y.permute(0, 2, 3, 1)
        return out.view(B, 2 * H, 2 * W, -1).permute(0, 3, 1, 2)


def _phase_kernels(w: torch.Tensor) -> torch.Tensor:
    """Phase kernels (2, 2, O, C, 2, 2) of a 3x3 conv weight (O, C, 3, 3) applied after 2x nearest
    up-sampling; bf16/fp16 weights have their taps summed in float32 and rounded once."""
    if w.dtype in (torch.bfloat16, torch.float16):
        taps = torch.tensor(_PHASE_TAPS, dtype=torch.float32, device=w.device)
        return torch.einsum('apk,oikl,bql->aboipq', taps, w.float(), taps).to(w.dtype)
    taps = torch.tensor(_PHASE_TAPS, dtype=w.dtype, device=w.device)
    return torch.einsum('apk,oikl,bql->aboipq', taps, w, taps)


class InvMbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck (1x1 expand, [2x up], 3x3 depthwise, 1x1 project) with a residual.

    With ``upsample`` the block doubles the resolution: the shortcut is an :class:`Upsample2d` and the
    expanded features are up-sampled before the depthwise conv.
    """

    def __init__(self, in_chs: int, out_chs: int, upsample: bool = False, expand_ratio: float = 4.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        mid_chs = make_divisible(out_chs * expand_ratio)
        if upsample:
            self.shortcut = Upsample2d(in_chs, out_chs)
        elif in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chs, eps=norm_eps)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, 1)
        self.act1 = nn.GELU()
        self.up = Upsample2d(mid_chs, mid_chs) if upsample else nn.Identity()
        self.conv2_kxk = nn.Conv2d(mid_chs, mid_chs, 3, padding=1, groups=mid_chs)
        self.act2 = nn.GELU()
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.conv1_1x1(self.pre_norm(x)))
        x = self.act2(self.conv2_kxk(self.up(x)))
        return self.drop_path(self.conv3_1x1(x)) + shortcut


class InvStem(nn.Module):
    """Last 2x up-sampling to RGB: up-conv, LayerNorm + GELU, 3x3 conv to ``out_chs``."""

    def __init__(self, in_chs: int, out_chs: int = 3, norm_eps: float = 1e-6):
        super().__init__()
        self.conv1 = Upsample2d(in_chs, in_chs)
        self.norm1 = LayerNormAct2d(in_chs, eps=norm_eps, act_layer=nn.GELU)
        self.conv2 = nn.Conv2d(in_chs, out_chs, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class ViTaminDecoder(nn.Module):
    """Tokens ``(B, Q + h*w, C)`` -> image ``(B, 3, ph, pw)`` (p: patch_size) (unbounded; ~[-1, 1] when trained).

    Args:
        embed_dim: token width C (the encoder width).
        conv_dims: channels of the two conv stages, coarse to fine, e.g. (320, 160) for ViTamin-L.
        depth, num_heads: transformer blocks over the token grid.
        conv_depths: inverted-MbConv blocks in the two conv stages (the first of each up-samples).
        num_query: leading query/register tokens, attended to and then dropped.
        drop_path: max stochastic-depth rate of the transformer blocks (linear in depth).
        patch_size: 16 (four 2x up-samplings) or 8 (three).
    """

    def __init__(self, embed_dim: int, conv_dims: tuple[int, int], depth: int, num_heads: int,
                 conv_depths: tuple[int, int] = (4, 2), num_query: int = 0, drop_path: float = 0.0,
                 mlp_ratio: float = 2.0, patch_size: int = 16):
        super().__init__()
        self.num_query = num_query
        self.grad_checkpointing = False
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r,
                  norm_layer=partial(LayerNorm, eps=1e-6), act_layer='gelu_tanh',
                  mlp_layer=GeGluMlp)
            for r in rates])
        self.norm = LayerNorm(embed_dim, eps=1e-6)
        c2, c1 = conv_dims
        # patch 8: the first stage keeps the grid's size (a 3x3 conv), so three stages up-sample 8x
        self.up_conv1 = Upsample2d(embed_dim, c2) if patch_size == 16 else nn.Conv2d(embed_dim, c2, 3, padding=1)
        self.up_conv2 = nn.Sequential(*[InvMbConvBlock(c2, c2, upsample=i == 0) for i in range(conv_depths[0])])
        self.up_conv3 = nn.Sequential(*[InvMbConvBlock(c2 if i == 0 else c1, c1, upsample=i == 0)
                                        for i in range(conv_depths[1])])
        self.up_conv4 = InvStem(c1, 3)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv, used for the adaptive GAN loss weight."""
        return self.up_conv4.conv2.weight

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        h, w = grid
        if N != self.num_query + h * w:
            raise ValueError(f'decoder got {N} tokens, expected {self.num_query} query + {h}x{w} grid tokens')
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        x = checkpoint_seq(self.blocks, x) if ckpt else self.blocks(x)
        x = self.norm(x[:, self.num_query:])                      # (B, h*w, C)
        x = x.view(B, h, w, C).permute(0, 3, 1, 2)                # (B, C, h, w), channels-last strides
        for stage in (self.up_conv1, self.up_conv2, self.up_conv3):
            x = checkpoint(stage, x, use_reentrant=False) if ckpt else stage(x)
        return self.up_conv4(x)                                   # (B, 3, p*h, p*w)
