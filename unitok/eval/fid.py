"""Fréchet distance between feature distributions, with statistics that do not depend on the batch
size or the number of processes: sums of features and of their outer products accumulate in
float64 and merge by addition (also across ranks, with one all-reduce).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class FeatureStats:
    """Running ``n``, ``sum x`` and ``sum x x^T`` of feature vectors, in float64."""

    def __init__(self, dim: int, device: torch.device | str = 'cpu'):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().to(self.sum.device, torch.float64).reshape(features.shape[0], -1)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> 'FeatureStats':
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.outer):
                dist.all_reduce(t)
            self.n = int(n.item())
        return self

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased covariance (``np.cov`` convention, as FID implementations use)."""
        if self.n < 2:
            raise ValueError(f'need at least 2 samples for a covariance, got {self.n}')
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})`` in float64.

    ``tr((S1 S2)^{1/2})`` is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix ``S1^{1/2} S2 S1^{1/2}`` (same eigenvalues as ``S1 S2``), which avoids the complex
    square roots and the instabilities of a general matrix square root.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    vals, vecs = torch.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root1 @ cov2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_covmean)


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
