"""Pixel reconstruction losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_losses(reconstruction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean absolute and mean squared error, computed in float32: ``{'l1', 'l2'}``."""
    reconstruction, target = reconstruction.float(), target.float()
    return {'l1': F.l1_loss(reconstruction, target), 'l2': F.mse_loss(reconstruction, target)}
