"""CLIP contrastive loss: open_clip's ``ClipLoss`` with the process layout passed in.

``rank`` and ``world_size`` are constructor arguments, as in open_clip: the default (0, 1) is the
symmetric in-batch cross-entropy of one process and runs no collective. With ``world_size > 1`` the
features are gathered over the default process group (open_clip's gather takes no group); with
``local_loss`` and ``gather_with_grad`` (the official setting) every rank scores its own images and
texts against the texts and images of the *global* batch, and gradients flow through the gathered
features, so N ranks compute the same loss and gradients as one rank with the global batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ContrastiveLoss(nn.Module):
    """``loss(image_features, text_features, logit_scale)``: features L2-normalised ``(B, E)``,
    ``logit_scale`` the multiplier itself (``exp`` of the learned log scale)."""

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        from open_clip.loss import ClipLoss
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f'ContrastiveLoss needs 0 <= rank < world_size, got rank {rank}, world_size {world_size}')
        self.rank, self.world_size = rank, world_size
        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                             rank=rank, world_size=world_size)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        return self.loss(image_features.float(), text_features.float(), logit_scale.float())
