"""Zero-shot classification with UniTok's CLIP-aligned embeddings (open_clip's classifier builder)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def check_templates(templates: Sequence[str | Callable[[str], str]]) -> None:
    """Zero-shot prompt templates are callables or strings with exactly one ``{}`` for the class name
    (a template without it would give every class the same prompt)."""
    for t in templates:
        if callable(t):
            continue
        if not isinstance(t, str):
            raise TypeError(f'zero-shot templates must be strings with one {{}} or callables, got {type(t).__name__}')
        try:
            ok = t.count('{}') == 1 and t.format('x') is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f'zero-shot template {t!r} must contain exactly one {{}} (where the class name goes) '
                             'and no other braces')


@torch.no_grad()
def zero_shot_classifier(model, classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]],
                         batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Class weights ``(E, C)`` of ``model``: the normalised mean text embedding of each class over the templates."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    if not classnames or not templates:
        raise ValueError('zero_shot_classifier needs at least one class name and one template')
    if isinstance(classnames, str) or not all(isinstance(c, str) for c in classnames):
        raise TypeError('classnames must be a list of strings')
    check_templates(templates)
    templates = [t if callable(t) else t.format for t in templates]
    return build_zero_shot_classifier(model, model.tokenize, list(classnames), templates,
                                      num_classes_per_batch=batch_size, device=model.device, use_tqdm=progress)


def check_classifier(classifier, embed_dim: int) -> None:
    """A classifier is an ``(embed_dim, C)`` tensor, as :func:`zero_shot_classifier` returns."""
    if not isinstance(classifier, torch.Tensor) or classifier.dim() != 2 or classifier.shape[0] != embed_dim:
        got = tuple(classifier.shape) if isinstance(classifier, torch.Tensor) else type(classifier).__name__
        raise ValueError(f'classifier must be a ({embed_dim}, C) tensor from zero_shot_classifier, got {got}')
