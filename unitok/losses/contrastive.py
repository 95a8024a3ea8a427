"""CLIP contrastive loss: open_clip's ``ClipLoss``, configured for the current process group.

With ``local_loss`` and ``gather_with_grad`` (the official setting) every rank scores its own
images and texts against the texts and images of the *global* batch, and gradients flow through
the gathered features, so N ranks compute the same loss and gradients as one rank with the
global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class ContrastiveLoss(nn.Module):
    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        from open_clip.loss import ClipLoss
        distributed = dist.is_available() and dist.is_initialized()
        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                             rank=dist.get_rank() if distributed else 0,
                             world_size=dist.get_world_size() if distributed else 1)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        return self.loss(image_features.float(), text_features.float(), logit_scale.float())
