"""Two adapters the tasks that train on exported codes share: a code dataset as a source of the training
stream, and a model's loss as the forward that the parallel wrappers (DDP, FSDP2) see."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn


class CodesSource:
    """A :class:`~unitok.codes.CodeDataset` as a map-style source of :class:`~unitok.data.TrainStream`
    (``len``, ``read``, ``key``). ``item(dataset, i)`` makes what ``read`` returns (default ``dataset[i]``);
    it must be a module-level function, since loader workers pickle the source."""

    def __init__(self, dataset, item: Callable[[Any, int], Any] | None = None):
        self.dataset, self.item = dataset, item

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, i: int):
        return self.dataset[i] if self.item is None else self.item(self.dataset, i)

    def key(self, i: int) -> str:
        return self.dataset.key(i)


class Objective(nn.Module):
    """``forward(*args)`` runs ``model.<method>(*args)`` (or ``model(*args)`` when ``method`` is None), so that
    a wrapper that hooks ``forward`` sees the whole training computation."""

    def __init__(self, model: nn.Module, method: str | None = None):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args):
        return (self.model if self.method is None else getattr(self.model, self.method))(*args)
