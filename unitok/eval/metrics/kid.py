"""Kernel Inception Distance (Bińkowski et al., 2018) of feature sets, and its subsampling interval.

Ours rather than torchmetrics': its subsets come from the global RNG over features in gather order
(values change with the process count) and it refuses sets smaller than the subset size; ours use
seeded subsets over the order the caller gives.
"""
from __future__ import annotations

import torch

from ...utils.seeds import mix_seed


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


def kid_interval(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                 seed: int = 0) -> dict[str, float]:
    """KID over ``subsets`` random subsets of ``min(subset_size, half the smaller set)`` samples (half, so
    that subsets differ even for small sets): mean, std, 2.5 / 97.5 percentiles and the subset size."""
    m = max(2, min(subset_size, min(real.shape[0], fake.shape[0]) // 2))
    values = torch.tensor([kernel_inception_distance(real, fake, subsets=1, subset_size=m,
                                                     seed=mix_seed(seed, i))[0] for i in range(subsets)],
                          dtype=torch.float64)
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {'mean': float(values.mean()), 'std': float(values.std(unbiased=False)), 'low': low, 'high': high,
            'subset_size': m}
