"""One task per model trained by the loop (:mod:`unitok.train.loop`). Task modules are imported on
first use, so that training one model does not import the others' packages."""
from __future__ import annotations

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


def __getattr__(name):
    if name in ('GeneratorTask', 'GenTrainConfig'):
        from . import generator
        return getattr(generator, name)
    raise AttributeError(name)


__all__ = ['TokenizerTask', 'GeneratorTask', 'GenTrainConfig', 'task_for']
