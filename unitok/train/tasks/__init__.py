"""One task per model trained by the loop (:mod:`unitok.train.loop`)."""
from __future__ import annotations

from .generator import GeneratorTask, GenTrainConfig
from .tokenizer import TokenizerTask


def task_for(cfg):
    """The task that trains what ``cfg`` describes (dispatch on the config's type)."""
    from ..config import TrainConfig
    if isinstance(cfg, TrainConfig):
        return TokenizerTask(cfg)
    make = getattr(cfg, 'make_task', None)
    if make is None:
        raise TypeError(f'no training task for a {type(cfg).__name__}')
    return make()


__all__ = ['TokenizerTask', 'GeneratorTask', 'GenTrainConfig', 'task_for']
