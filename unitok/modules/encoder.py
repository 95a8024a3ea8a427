"""Image encoder: timm's ViTamin hybrid (conv stem + MbConv stages down to 1/16, then a ViT with
GeGLU MLPs and no positional embedding), built with the kwargs of the official UniTok.

ViTamin: "Designing Scalable Vision Models in the Vision-Language Era", Chen et al., CVPR 2024.
We wrap timm's implementation; only the variant table below is ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer
from timm.models.vitamin import GeGluMlp, MbConvStages, VitCfg, VitConvCfg


@dataclass(frozen=True)
class ViTaminSpec:
    """Widths and depths of one ViTamin variant."""
    stem_width: int                  # conv stem output channels (stride 2)
    conv_dims: tuple[int, int]       # MbConv stage widths (stride 4 and 8)
    conv_depths: tuple[int, int]     # MbConv blocks per stage
    embed_dim: int                   # transformer width (stride 16)
    depth: int                       # transformer blocks
    num_heads: int


VITAMIN_VARIANTS: dict[str, ViTaminSpec] = {
    # Ours: a CPU-sized variant for tests, demos and ablations.
    'vitamin_tiny': ViTaminSpec(32, (32, 64), (1, 1), 128, 2, 2),
    'vitamin_small': ViTaminSpec(64, (64, 128), (2, 4), 384, 14, 6),
    'vitamin_base': ViTaminSpec(128, (128, 256), (2, 4), 768, 14, 12),
    'vitamin_large': ViTaminSpec(160, (160, 320), (2, 4), 1024, 31, 16),
    'vitamin_xlarge': ViTaminSpec(192, (192, 384), (2, 4), 1152, 32, 16),
}


def build_encoder(variant: str, image_size: int, num_query: int = 0, drop_path: float = 0.0,
                  patch_size: int = 16) -> VisionTransformer:
    """A timm ``VisionTransformer`` with a ViTamin conv backbone as patch embedding.

    Parameter names and numerics match the official UniTok encoder: tanh-GELU GeGLU MLPs, eps 1e-6
    LayerNorms, ``num_query`` register tokens in front, a final norm and no pooling or head. Input
    ``(B, 3, H, W)`` with H, W multiples of 16; output ``(B, num_query + H/16 * W/16, embed_dim)``.
    ``image_size`` only fixes the size of timm's dummy forward at build time. ``patch_size=8``: the
    last strided conv keeps the size (stride 1, same padding), so the grid is H/8 x W/8.
    """
    spec = VITAMIN_VARIANTS[variant]
    backbone = MbConvStages(cfg=VitCfg(
        embed_dim=(*spec.conv_dims, spec.embed_dim),
        depths=(*spec.conv_depths, 1),
        stem_width=spec.stem_width,
        conv_cfg=VitConvCfg(norm_layer='layernorm2d', norm_eps=1e-6),
        head_type='1d',
    ))
    if patch_size == 8:
        backbone.pool.proj.stride = (1, 1)
    elif patch_size != 16:
        raise ValueError(f'patch_size must be 16 or 8, got {patch_size}')
    encoder = VisionTransformer(
        img_size=image_size, patch_size=1, embed_layer=partial(HybridEmbed, backbone=backbone, proj=False),
        embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=2.0,
        mlp_layer=GeGluMlp, act_layer='gelu_tanh',
        class_token=False, reg_tokens=num_query, pos_embed='none', global_pool='', fc_norm=False,
        num_classes=0, drop_rate=0.0, drop_path_rate=drop_path,
    )
    # The official model adds a frozen all-zero (1, 1, C) positional embedding: keep it so that
    # released state dicts load strictly (adding zeros is exact).
    encoder.pos_embed = torch.nn.Parameter(torch.zeros(1, 1, spec.embed_dim), requires_grad=False)
    return encoder
