"""The official UniTok release format: ``{'args': ..., 'trainer': {'unitok': state_dict}}`` in a ``.pth``.

Reading never executes pickled code (:mod:`unitok.safe_pickle`); loading is strict like every model
load (:mod:`unitok.pretrained`); writing gives what the official ``inference.py`` expects.
"""
from __future__ import annotations

import torch

from .model import UniTok
from .quantizers import to_official_layout
from .safe_pickle import read_official_checkpoint
from .utils.io import atomic_write

__all__ = ['read_official_checkpoint', 'load_official_checkpoint', 'official_state_dict',
           'save_official_checkpoint']


def load_official_checkpoint(path: str, map_location: str | torch.device = 'cpu') -> UniTok:
    """Build a :class:`UniTok` from an official release checkpoint (strict: every key must match)."""
    config, state = read_official_checkpoint(path, map_location)
    return UniTok._from_state(config, state, where=repr(path))


def official_state_dict(model: UniTok) -> dict[str, torch.Tensor]:
    """The model's state dict under the official key names (for tools built on the official code)."""
    return to_official_layout(model.state_dict())


def save_official_checkpoint(model: UniTok, path: str) -> None:
    """Write ``{'args': ..., 'trainer': {'unitok': state_dict}}`` as the official ``inference.py`` expects."""
    state = {k: v.detach().cpu().contiguous() for k, v in official_state_dict(model).items()}
    ckpt = {'args': model.config.to_official_args(), 'trainer': {'unitok': state}}
    atomic_write(path, lambda p: torch.save(ckpt, p), mode='path')
