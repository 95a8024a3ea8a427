"""What the implicit-codebook quantizers (FSQ, LFQ, BSQ) share: the latent is mapped into K groups
of g dims, each group is rounded to one of V fixed points, and the rounded groups are mapped back.

When the latent width D differs from K * g (8 groups of 9 bits = 72 dims for a 32-wide latent) a
pair of learned linear maps does it; the quantizer's code vectors are then what each group's points
add to the latent through the map back, so the codes' identity changes when the map does.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class GroupProjection(nn.Module):
    """Latent (B, T, D) <-> K groups of g dims (B, T, K, g); identity maps when D == K * g.

    Args:
        dim: D, the latent width.
        groups: K.
        group_dim: g.
    """

    def __init__(self, dim: int, groups: int, group_dim: int):
        super().__init__()
        self.dim, self.groups, self.group_dim = dim, groups, group_dim
        inner = groups * group_dim
        # out before in: the first parameter is the one that decides what codes mean
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()

    def split(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, K, g) float32."""
        if latents.dim() != 3 or latents.shape[-1] != self.dim:
            raise ValueError(f'quantizer expects latents (B, T, {self.dim}), got {tuple(latents.shape)}')
        B, T, _ = latents.shape
        return self.project_in(latents.float()).view(B, T, self.groups, self.group_dim)

    def merge(self, groups: torch.Tensor) -> torch.Tensor:
        """(B, T, K, g) -> (B, T, D)."""
        B, T = groups.shape[:2]
        return self.project_out(groups.reshape(B, T, self.groups * self.group_dim))

    def code_vectors(self, points: torch.Tensor, k: int) -> torch.Tensor:
        """What the V points (V, g) of group k add to the latent: (V, D) through the map back (its bias
        shared evenly among the K groups), or the points themselves (V, g) without a map."""
        if isinstance(self.project_out, nn.Identity):
            return points.float()
        w, b = self.project_out.weight.float(), self.project_out.bias.float()
        g = self.group_dim
        return points.float() @ w[:, k * g:(k + 1) * g].T + b / self.groups
