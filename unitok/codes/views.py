"""The views exported per image (``A`` in the shard layout): view 0 is the evaluation transform
(shorter side resized to the tokenizer's image size, bicubic, centre crop); ``flip`` adds its mirror
image; ``tencrop`` adds torchvision's ten crops of the image resized to 1.1x the size (as LlamaGen's
code extraction does): the four corners and centre, then the same five of the mirrored image."""
from __future__ import annotations

from typing import Sequence

import torch

AUGMENTATIONS = ('none', 'flip', 'tencrop')
TENCROP_SCALE = 1.1
_TENCROP_NAMES = ('tl', 'tr', 'bl', 'br', 'center')


def parse_augment(augment: str | Sequence[str] | None) -> tuple[str, ...]:
    """``'flip,tencrop'`` (or a sequence) -> the extra views after view 0, validated; ``'none'`` adds nothing."""
    if augment is None:
        return ()
    names = [a.strip() for a in (augment.split(',') if isinstance(augment, str) else augment) if a.strip()]
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f'unknown augmentation(s) {unknown}; choose from {list(AUGMENTATIONS)} (comma-separated)')
    extras = [a for a in names if a != 'none']
    if len(set(extras)) != len(extras):
        raise ValueError(f'augmentation listed twice in {names}')
    return tuple(a for a in AUGMENTATIONS if a in extras)      # canonical order


def view_names(augment: Sequence[str]) -> list[str]:
    names = ['center']
    if 'flip' in augment:
        names.append('center-flip')
    if 'tencrop' in augment:
        names += [f'tencrop-{c}' for c in _TENCROP_NAMES] + [f'tencrop-flip-{c}' for c in _TENCROP_NAMES]
    return names


class ViewTransform:
    """PIL image -> ``(A, 3, size, size)`` float tensor in [-1, 1], the views of :func:`view_names`."""

    def __init__(self, size: int, augment: Sequence[str] = ()):
        from torchvision import transforms as T

        from ..data import eval_transform
        self.size, self.augment = size, tuple(augment)
        self.center = eval_transform(size)
        big = int(round(size * TENCROP_SCALE))
        bicubic = T.InterpolationMode.BICUBIC
        self.tencrop = T.Compose([T.Resize(big, interpolation=bicubic, antialias=True), T.CenterCrop(big),
                                  T.TenCrop(size)])
        self.to_tensor = T.ToTensor()

    def __call__(self, image) -> torch.Tensor:
        center = self.center(image)                                # (3, size, size)
        views = [center]
        if 'flip' in self.augment:
            views.append(center.flip(-1))
        if 'tencrop' in self.augment:
            views += [self.to_tensor(c).mul(2.0).sub(1.0) for c in self.tencrop(image)]
        return torch.stack(views)                                  # (A, 3, size, size)

