"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) of feature sets.

Ours: torchmetrics has no generative precision/recall, and torch-fidelity's runs its own extraction
pipeline rather than taking features.
"""
from __future__ import annotations

import torch


def _pairwise_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(len(a), len(b))`` in float64 (clamped at 0)."""
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def _kth_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance of every row of ``x`` to its k-th nearest other row."""
    out = []
    for s in range(0, x.shape[0], chunk):
        d = _pairwise_sq(x[s:s + chunk], x)
        # the row itself is at distance 0 and comes first: the k-th other neighbour is entry k
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _covered(query: torch.Tensor, ref: torch.Tensor, radius: torch.Tensor, chunk: int) -> torch.Tensor:
    """Whether each query row lies in at least one ball (ref_j, radius_j)."""
    out = []
    for s in range(0, query.shape[0], chunk):
        out.append((_pairwise_sq(query[s:s + chunk], ref) <= radius[None, :]).any(1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) of feature sets ``(N, D)``.

    Each set's manifold is the union of balls around its samples reaching their k-th nearest
    neighbour in the set. Precision: share of ``fake`` samples inside the real manifold; recall: share
    of ``real`` samples inside the fake manifold. Float64 distances.
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f'precision_recall takes feature sets (N, D) of one D, got {tuple(real.shape)} '
                         f'and {tuple(fake.shape)}')
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f'precision_recall with k={k} needs more than {k} samples per set, '
                         f'got {real.shape[0]} real and {fake.shape[0]} generated')
    r, f = real.double(), fake.double()
    precision = _covered(f, r, _kth_radius(r, k, chunk), chunk).double().mean()
    recall = _covered(r, f, _kth_radius(f, k, chunk), chunk).double().mean()
    return float(precision), float(recall)
