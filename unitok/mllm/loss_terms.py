"""The two terms of the MLLM's training loss, each as (summed loss, count, accuracy) so that ranks and
micro-batches can be summed before dividing: text cross-entropy at labelled positions, and the depth
head's cross-entropy at image positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..generation.heads import DepthHead
from .data import IGNORE


def text_terms(model, h: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Summed text cross-entropy over the positions with a label, their count, and the accuracy there."""
    text = labels != IGNORE
    text_sum, text_acc = (h.new_zeros((), dtype=torch.float32),) * 2
    if bool(text.any()):
        logits = model.text_logits(h[text]).float()
        text_sum = F.cross_entropy(logits, labels[text], reduction='sum')
        text_acc = (logits.argmax(-1) == labels[text]).float().mean()
    return text_sum, text.sum(), text_acc


def image_terms(head: DepthHead, h: torch.Tensor, codes: torch.Tensor, targets: torch.Tensor) -> tuple:
    """The depth head's cross-entropy (mean over the K sub-codes) summed over the image targets (position
    t predicts the codes of t+1), their count, and the accuracy."""
    sel = targets[:, :-1]
    img_sum, img_acc = (h.new_zeros((), dtype=torch.float32),) * 2
    if bool(sel.any()):
        hh = h[:, :-1][sel].to(head.pos_embed.dtype)
        tgt = codes[:, 1:][sel]                                                    # (N, K)
        logits = head(hh, tgt).float()                                             # (N, K, V)
        ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction='none').view_as(tgt)
        img_sum = ce.mean(1).sum()
        img_acc = (logits.argmax(-1) == tgt).float().mean()
    return img_sum, sel.sum(), img_acc
