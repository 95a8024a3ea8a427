"""The distribution metrics of one feature space: Fréchet distance, KID with its interval, precision
and recall, under the key names every report uses."""
from __future__ import annotations

import torch

from .frechet import frechet_distance
from .kid import kid_interval
from .precision_recall import precision_recall


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, name: str, *, pr_k: int = 3,
                         kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """``fd_``, ``kid_`` (+ ``_std``, ``_low``, ``_high``), ``precision_``, ``recall_`` keys for the
    features ``(N, D)`` of extractor ``name``."""
    kid = kid_interval(real, fake, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real, fake, pr_k)
    return {f'fd_{name}': frechet_distance(real, fake), f'kid_{name}': kid['mean'], f'kid_{name}_std': kid['std'],
            f'kid_{name}_low': kid['low'], f'kid_{name}_high': kid['high'],
            f'precision_{name}': precision, f'recall_{name}': recall}
