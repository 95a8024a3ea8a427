"""Condition consistency: the share of samples a classifier assigns to the requested class, its
shuffled-label control, and the linear-probe classifier."""
from __future__ import annotations

import torch


class LinearProbe:
    """Multinomial logistic regression on standardised features, fitted by L-BFGS in float64.

    Deterministic (zero initialisation, full-batch, no random draws), so it needs no seed.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-3,
                 iters: int = 200):
        x = features.double()
        labels = torch.as_tensor(labels, dtype=torch.long)
        if x.dim() != 2 or labels.shape != (x.shape[0],):
            raise ValueError(f'LinearProbe takes features (N, D) and labels (N,), got {tuple(x.shape)} and '
                             f'{tuple(labels.shape)}')
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f'LinearProbe labels must lie in [0, {num_classes})')
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-12)
        z = (x - self.mean) / self.std
        self.weight = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], lr=1, max_iter=iters, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn='strong_wolfe')

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ self.weight + self.bias, labels) \
                + l2 * self.weight.pow(2).sum()
            loss.backward()
            return loss
        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = self.weight.detach(), self.bias.detach()

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted classes ``(N,)`` int64."""
        return (((features.double() - self.mean) / self.std) @ self.weight + self.bias).argmax(1)


def consistency(predicted: torch.Tensor, requested: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """``(share of predictions equal to the requested class, the same against a seeded random
    permutation of the requested labels)``; the second is the shuffled-label control (~chance)."""
    predicted, requested = predicted.long().cpu(), requested.long().cpu()
    perm = torch.randperm(requested.numel(), generator=torch.Generator().manual_seed(seed))
    return (float((predicted == requested).double().mean()), float((predicted == requested[perm]).double().mean()))
