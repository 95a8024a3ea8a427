"""Distances between feature distributions of originals and reconstructions.

* :class:`FrechetDistance`: torchmetrics' ``FrechetInceptionDistance`` over feature vectors that
  the caller extracts (one extractor pass per batch feeds the Fréchet distance, KID and the
  Inception Score): sums of features and of their outer products in float64, merged by addition, so
  the value does not depend on the batch size or the number of processes. Its collective is
  explicit: ``sync_on_compute=True`` gathers the sums over ``process_group`` (``None``: the default
  group) in ``compute``; the default runs none.
* :func:`kernel_inception_distance` and :func:`inception_score` stay ours: torchmetrics' versions
  draw their random subsets / splits with the global RNG over features in the order the ranks
  gathered them (so the value changes with the process count and between runs) and refuse sets
  smaller than the subset size; ours use a fixed seed over a canonical sample order.
"""
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


def kernel_inception_distance(feats1: torch.Tensor, feats2: torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al., 2018): unbiased MMD^2 with the cubic polynomial kernel, mean and std over
    random subsets (``torch-fidelity``'s defaults)."""
    f1, f2 = feats1.double(), feats2.double()
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError('KID needs at least 2 samples per set')
    d = f1.shape[1]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = f1[torch.randperm(f1.shape[0], generator=g)[:m]]
        y = f2[torch.randperm(f2.shape[0], generator=g)[:m]]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        mmd = (kxx.sum() - kxx.diag().sum() + kyy.sum() - kyy.diag().sum()) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(float(mmd))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class logits (N, C): exp(E_x KL(p(y|x) || p(y))), mean/std over splits."""
    p = logits.double().softmax(-1)
    scores = []
    for part in p.chunk(splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - py.clamp_min(1e-30).log())).sum(1).mean()
        scores.append(float(kl.exp()))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))
