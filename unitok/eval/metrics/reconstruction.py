"""Per-image reconstruction metrics of images in [-1, 1] (PSNR and SSIM through torchmetrics on the
[0, 1] scale, L1 on the [-1, 1] scale), per image so that sums do not depend on batching.

LPIPS is the training loss's network (:meth:`unitok.losses.LPIPSPerceptual.per_image`): torchmetrics'
LPIPS downloads its VGG16 trunk and takes no local file.
"""
from __future__ import annotations

import torch

# 1e-12 mean squared error (120 dB) for identical images, instead of an infinite PSNR that JSON cannot hold.
MAX_PSNR = 120.0


def _unit(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (images.to(dtype) + 1) / 2


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, ``(B,)`` float64, on the [0, 1] scale, at most :data:`MAX_PSNR`."""
    from torchmetrics.functional.image import peak_signal_noise_ratio
    value = peak_signal_noise_ratio(_unit(reconstruction, torch.float64), _unit(target, torch.float64),
                                    data_range=1.0, reduction='none', dim=(1, 2, 3))
    return value.clamp_max(MAX_PSNR)


def l1(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error, ``(B,)`` float64, on the [-1, 1] scale (twice the [0, 1] value)."""
    return (reconstruction.double() - target.double()).abs().flatten(1).mean(1)


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, ``(B,)``: Gaussian window 11, sigma 1.5, data range 1 (the standard setting).
    Computed in float32 (float64 convolutions have no fast CPU kernels), returned as float64."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    return structural_similarity_index_measure(_unit(reconstruction, torch.float32), _unit(target, torch.float32),
                                               data_range=1.0, reduction='none').double()
