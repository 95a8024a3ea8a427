"""Inception Score of class logits; ours (fixed splits over the caller's sample order) for the
reason given in :mod:`.kid`."""
from __future__ import annotations

import torch


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
