"""Token-weighted means of per-batch losses (negative log-likelihoods, accuracies), as sums that
add over batches and processes: ``weighted_sums`` per batch, summed (and all-reduced), then
``weighted_means``."""
from __future__ import annotations

from typing import Sequence

import torch


def weighted_sums(values: Sequence, weight: float) -> torch.Tensor:
    """``[v * weight for v in values] + [weight]``, float64 ``(len(values) + 1,)``, on the values' device
    (scalar tensors or numbers; no host synchronisation for tensors)."""
    parts = [torch.as_tensor(v, dtype=torch.float64) for v in values]
    device = parts[0].device if parts else 'cpu'
    return torch.cat([torch.stack([p.to(device) for p in parts]) * weight,
                      torch.tensor([weight], dtype=torch.float64, device=device)])


def weighted_means(sums: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """``{name: sum / total weight}`` of sums laid out by :func:`weighted_sums` (summed over batches);
    a total weight under 1 counts as 1 (no samples: zeros)."""
    count = max(1.0, float(sums[len(names)]))
    return {name: float(sums[i]) / count for i, name in enumerate(names)}


def codebook_nll(sums: torch.Tensor, num_codebooks: int) -> dict[str, float]:
    """``nll_0`` .. ``nll_{K-1}`` and their mean ``nll`` from sums whose first K values are the
    per-sub-codebook NLL sums (nats) and whose entry K is the sample count."""
    names = [f'nll_{k}' for k in range(num_codebooks)]
    out = weighted_means(torch.cat([sums[:num_codebooks], sums[-1:]]), names)
    out['nll'] = sum(out.values()) / num_codebooks
    return out
