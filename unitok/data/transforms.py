"""Image transforms of the training and evaluation pipelines (PIL -> tensor in [-1, 1]).

Training follows the official recipe (open_clip's train transform with mean = std = 0.5):
random-resized crop with scale (0.9, 1.0), bicubic, optional horizontal flip. Evaluation resizes
the shorter side to the model size and takes the centre crop.
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T


def _to_model_range(x: torch.Tensor) -> torch.Tensor:
    return x.mul(2.0).sub_(1.0)


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f'transform size must be a positive integer, got {size!r}')


def train_transform(size: int, scale: tuple[float, float] = (0.9, 1.0), hflip: bool = False) -> Callable:
    _check_size(size)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f'crop scale must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}')
    steps = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), _to_model_range]
    return T.Compose(steps)


def eval_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation protocol: shorter side to ``size`` (bicubic, antialiased), centre crop, [-1, 1]."""
    _check_size(size)
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(size), T.ToTensor(), _to_model_range])
