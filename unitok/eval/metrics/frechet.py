"""Fréchet distance of feature sets: torchmetrics' ``FrechetInceptionDistance`` over features that the
caller extracts, with float64 sums that merge by addition (independent of batching and process count)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance


class _Float64Features(nn.Module):
    """The "feature module" of :class:`FrechetDistance`: the identity on already extracted ``(B, D)``
    features, cast to float64 (so torchmetrics also returns the distance in float64)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.detach().reshape(features.shape[0], -1).double()


class FrechetDistance(FrechetInceptionDistance):
    """Fréchet distance of ``dim``-dimensional features: ``update(features (B, dim), real=True|False)``,
    ``compute()`` -> float64 scalar tensor (``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``,
    unbiased covariances, the pytorch-fid / torch-fidelity convention).

    Args:
        dim: feature dimension.
        sync_on_compute: gather the statistics over ``process_group`` in ``compute`` (one collective
            per statistic); default ``False``: this process's statistics only, no collective.
        process_group: the group to gather over (``None``: the default group).
    """

    def __init__(self, dim: int, sync_on_compute: bool = False, process_group=None):
        super().__init__(feature=_Float64Features(dim), reset_real_features=True,
                         sync_on_compute=sync_on_compute, process_group=process_group)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of two feature sets ``(N, D)`` (float64 statistics, this process only)."""
    fd = FrechetDistance(real.shape[1])
    fd.update(real, real=True)
    fd.update(fake, real=False)
    return float(fd.compute())
