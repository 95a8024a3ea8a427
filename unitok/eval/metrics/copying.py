"""Memorisation of generated samples: nearest-training-image distances, calibrated on held-out images."""
from __future__ import annotations

import torch


def nearest_distances(query: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Cosine distance ``1 - cos`` of every query row to its nearest reference row, float64 ``(N,)``."""
    q = torch.nn.functional.normalize(query.double(), dim=1)
    r = torch.nn.functional.normalize(reference.double(), dim=1)
    return torch.cat([(1 - q[s:s + chunk] @ r.T).amin(1) for s in range(0, q.shape[0], chunk)]).clamp_min(0)


def copy_statistics(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor,
                    percentile: float = 1.0) -> dict[str, float]:
    """Memorisation of ``samples`` against ``train`` features, calibrated on ``held_out`` real ones.

    Returns ``copy_rate`` (share of samples with a nearest-training-image distance <= the
    ``percentile``-th percentile of the held-out images' ones), ``copy_threshold`` and
    ``nn_distance_ratio`` (mean sample distance / mean held-out distance).
    """
    d_samples, d_held = nearest_distances(samples, train), nearest_distances(held_out, train)
    threshold = float(torch.quantile(d_held, percentile / 100))
    mean_held = float(d_held.mean())
    return {'copy_rate': float((d_samples <= threshold).double().mean()), 'copy_threshold': threshold,
            'nn_distance_ratio': float(d_samples.mean()) / mean_held if mean_held > 0 else float('inf')}
