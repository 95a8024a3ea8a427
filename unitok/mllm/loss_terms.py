"""The MLLM's training loss: text cross-entropy at labelled positions and the sub-code head's cross-entropy at
image positions, combined in one of two ways (``loss``):

* ``'ours'`` (the default): each image position weighs like one text token, its loss the mean over its K
  sub-codes; the summed losses are divided by the number of text targets plus image positions.
* ``'official'`` (the released MLLM's training, ``eval/liquid/model/language_model/mini_gemini_llama.py``):
  every sub-code counts as a token, so an image position weighs K text tokens; the image side adds a z-loss of
  :data:`Z_LOSS` times the squared largest logit of each sub-code's distribution. As there, the text and image
  means are weighted by their token counts, which is the summed losses over ``text targets + K * image
  positions``.

The terms are kept as sums with their counts, so that ranks and micro-batches can be added before dividing
(:func:`target_count` is the count a data-parallel run reduces).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE

LOSSES = ('ours', 'official')
Z_LOSS = 5e-5            # the official image z-loss weight (of max(logits) ** 2, per sub-code)


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
    return loss


def text_terms(model, h: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Summed text cross-entropy over the positions with a label, their count, and the accuracy there."""
    text = labels != IGNORE
    text_sum, text_acc = (h.new_zeros((), dtype=torch.float32),) * 2
    if bool(text.any()):
        logits = model.text_logits(h[text]).float()
        text_sum = F.cross_entropy(logits, labels[text], reduction='sum')
        text_acc = (logits.argmax(-1) == labels[text]).float().mean()
    return text_sum, text.sum(), text_acc


def image_terms(head, h: torch.Tensor, codes: torch.Tensor, targets: torch.Tensor) -> tuple:
    """The head's cross-entropy of every sub-code at the image targets (position t predicts the codes of t+1)
    ``(N, K)``, the squared largest logit of each ``(N, K)`` (the official z-loss's term) and the accuracy."""
    sel = targets[:, :-1]
    K = codes.shape[-1]
    if not bool(sel.any()):
        empty = h.new_zeros((0, K), dtype=torch.float32)
        return empty, empty, h.new_zeros((), dtype=torch.float32)
    hh = h[:, :-1][sel].to(head.pos_embed.dtype)
    tgt = codes[:, 1:][sel]                                                    # (N, K)
    logits = head(hh, tgt).float()                                             # (N, K, V)
    ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction='none').view_as(tgt)
    return ce, logits.amax(-1).pow(2), (logits.argmax(-1) == tgt).float().mean()


def target_count(batch: dict, num_codebooks: int, loss: str = 'ours') -> torch.Tensor:
    """What the summed losses of ``batch`` are divided by: text targets plus image positions (``'ours'``) or
    plus every sub-code of them (``'official'``)."""
    per_position = num_codebooks if check_loss(loss) == 'official' else 1
    return (batch['labels'] != IGNORE).sum() + per_position * batch['image_targets'][:, :-1].sum()


def combined_loss(model, h: torch.Tensor, batch: dict, denominator: torch.Tensor | None = None,
                  loss: str = 'ours') -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a batch from the LLM's last hidden states ``h (B, T, C)`` and the metrics to log (the
    text and image cross-entropies as means per target, whichever ``loss`` weighs them)."""
    text_sum, text_n, text_acc = text_terms(model, h, batch['labels'])
    ce, zsq, img_acc = image_terms(model.head, h, batch['codes'], batch['image_targets'])
    if check_loss(loss) == 'official':
        img_sum = ce.sum() + Z_LOSS * zsq.sum()
    else:
        img_sum = ce.mean(1).sum()
    if denominator is None:
        denominator = target_count(batch, ce.shape[1], loss).clamp_min(1)
    w = model.loss_weights
    total = (w[0] * text_sum + w[1] * img_sum) / denominator
    metrics = {'loss': total.detach(), 'text_loss': (text_sum / text_n.clamp_min(1)).detach(),
               'image_loss': (ce.sum() / max(1, ce.numel())).detach(), 'text_accuracy': text_acc.detach(),
               'image_accuracy': img_acc.detach()}
    if loss == 'official':
        metrics['z_loss'] = (Z_LOSS * zsq.sum() / max(1, zsq.numel())).detach()
    return total, metrics
