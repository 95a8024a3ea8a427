"""Per-image reconstruction metrics on images in [-1, 1], summed so that averages do not depend on
batching: PSNR and SSIM (torchmetrics, data range 1 on the [0, 1] scale). LPIPS is the training
loss's network, :meth:`unitok.losses.LPIPSPerceptual.per_image`."""
from __future__ import annotations

import torch


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, (B,), on the [0, 1] scale."""
    mse = ((reconstruction.double() - target.double()) / 2).square().flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, (B,): Gaussian window 11, sigma 1.5, data range 1 (the standard setting).
    Computed in float32 (float64 convolutions have no fast CPU kernels), summed by the caller in float64."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    x, y = (reconstruction.float() + 1) / 2, (target.float() + 1) / 2
    return structural_similarity_index_measure(x, y, data_range=1.0, reduction='none').double()
