"""Exponential moving average of model weights (the official code declares ``ema`` but never uses it)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn


class EMA:
    """Shadow copies of the trainable float parameters, updated as ``shadow = lerp(shadow, param, 1 - d)``.

    The decay is warmed up, ``d = min(decay, (1 + t) / (10 + t))`` at update t, so that the average is
    useful in short runs too. Works on sharded (FSDP2) parameters: the shadows are shaped like the local
    shards.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().clone().float() for n in self.names]
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = dict(model.named_parameters())
        # One fused update per tensor type: FSDP2 mixes sharded DTensors and plain tensors.
        groups: dict[type, tuple[list, list]] = {}
        for s, n in zip(self.shadow, self.names):
            p = params[n].detach()
            shadows, values = groups.setdefault(type(p), ([], []))
            shadows.append(s)
            values.append(p.float())
        for shadows, values in groups.values():
            torch._foreach_lerp_(shadows, values, 1 - d)
        self.updates += 1

    @contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the averaged weights into ``model``."""
        params = dict(model.named_parameters())
        backup = [params[n].detach().clone() for n in self.names]
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                params[n].copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, b in zip(self.names, backup):
                    params[n].copy_(b)

    def state_dict(self) -> dict:
        return {'decay': self.decay, 'updates': self.updates, 'shadow': dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state['shadow']]
        if missing:
            raise KeyError(f'EMA state lacks {missing[:3]}')
        self.updates = int(state['updates'])
        with torch.no_grad():
            for s, n in zip(self.shadow, self.names):
                s.copy_(state['shadow'][n])
