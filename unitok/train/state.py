"""Training checkpoints: atomic single-file writes, keep-last-k, ``latest`` lookup, RNG capture.

A checkpoint is one ``torch.save`` file of tensors and plain containers, read back with
``weights_only=True``. Written to a temporary file and renamed, it is either complete or absent.
"""
from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..utils.io import atomic_write

PATTERN = re.compile(r'step_(\d+)\.pt$')


class Checkpointer:
    def __init__(self, directory: str, keep_last: int = 3):
        self.directory, self.keep_last = directory, keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f'step_{step:08d}.pt')

    def all(self) -> list[tuple[int, str]]:
        found = []
        for p in glob.glob(os.path.join(self.directory, 'step_*.pt')):
            m = PATTERN.search(p)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> str | None:
        found = self.all()
        return found[-1][1] if found else None

    def save(self, step: int, state: dict) -> str:
        path = self.path(step)
        atomic_write(path, lambda p: torch.save(state, p), mode='path')
        if self.keep_last > 0:
            for _, old in self.all()[:-self.keep_last]:
                os.remove(old)
        return path

    def resolve(self, which: str) -> str:
        """``'latest'`` or a file path -> an existing checkpoint path."""
        if which == 'latest':
            path = self.latest()
            if path is None:
                raise CheckpointError(f'--resume latest: no checkpoint in {self.directory!r}')
            return path
        if not os.path.isfile(which):
            raise CheckpointError(f'no checkpoint file {which!r}')
        return which

    @staticmethod
    def load(path: str) -> dict:
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise CheckpointError(f'cannot read training checkpoint {path!r}: {type(e).__name__}: {e}') from None


def capture_rng() -> dict:
    """Every RNG the training process draws from (torch CPU/CUDA, numpy, python)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached': float(cached)}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
