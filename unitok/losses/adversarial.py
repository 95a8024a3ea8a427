"""Adversarial training parts: discriminators, differentiable augmentation, hinge losses and the
adaptive generator weight.

* ``DinoDiscriminator``: a frozen DINOv2 ViT-S/14 (timm; the released weights from a file, its
  folder or the hub id ``FoundationVision/unitok_external``) whose tokens at
  several depths feed small trainable 1-D conv heads, as in the UniTok / VAR recipe.
* ``PatchGANDiscriminator``: the pix2pix convolutional patch discriminator, trained from scratch.
* ``DiffAug``: translation, colour and cutout augmentation applied to real and fake images alike
  (Zhao et al., 2020), plus a Gaussian blur that fades out while the discriminator warms up.
"""
from __future__ import annotations

import math
import random

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..pretrained import CheckpointError
from ..safe_pickle import read_state_dict
from ..sequence import square_grid
from .perceptual import EXTERNAL_REPO, external_weights

DINO_FILE = 'dinov2_vits14_pretrain.pth'        # the official recipe's name (utils/config.py)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------- losses
def discriminator_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def generator_hinge_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_generator_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              clamp: tuple[float, float] = (0.015, 1e4), sync: bool = False,
                              process_group=None) -> torch.Tensor:
    """``||d nll / d w|| / ||d g_loss / d w||`` at the decoder's last layer, clamped (Esser et al., 2021).

    With ``sync=True`` both gradients are first averaged over the ranks of ``process_group`` (``None``:
    the default group; one all-reduce), so the weight is the one of the global batch and equal on
    every rank. The default, ``sync=False``, runs no collective: the weight of this rank's batch.
    """
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0].detach()
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].detach()
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        both = torch.stack([g_nll, g_adv])
        dist.all_reduce(both, group=process_group)
        g_nll, g_adv = both / dist.get_world_size(process_group)
    return (g_nll.norm() / (g_adv.norm() + 1e-6)).clamp(*clamp)


# ---------------------------------------------------------------------- augmentation
class DiffAug:
    """Differentiable augmentation of image batches in [-1, 1] (same ops for real and fake).

    Each of translation (up to 1/8 of the size, zero fill), colour (brightness, saturation,
    contrast) and cutout (a square of ``cutout`` x size set to zero) is applied to the whole batch
    with probability ``prob``, with per-image random parameters.
    """

    def __init__(self, prob: float = 1.0, cutout: float = 0.2):
        self.prob, self.cutout = prob, cutout

    def __call__(self, x: torch.Tensor, blur: float = 0.0) -> torch.Tensor:
        x = x.float()
        if blur > 0:
            x = gaussian_blur(x, sigma=math.sqrt(x.shape[-2] * 0.5) * blur)
        if self.prob <= 0:
            return x
        do_translate, do_color, do_cutout = (torch.rand(3) < self.prob).tolist()
        B, _, H, W = x.shape
        r = torch.rand(7, B, 1, 1, 1, device=x.device)
        if do_translate:
            x = _translate(x, r[0], r[1])
        if do_color:
            x = x + (r[2] - 0.5)                                            # brightness
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (2 * r[3]) + mean                              # saturation
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (r[4] + 0.5) + mean                            # contrast
        if do_cutout and self.cutout > 0:
            ch, cw = round(H * self.cutout), round(W * self.cutout)
            cy, cx = (r[5] * H).floor().long().view(B, 1, 1), (r[6] * W).floor().long().view(B, 1, 1)
            ys = torch.arange(H, device=x.device).view(1, H, 1)
            xs = torch.arange(W, device=x.device).view(1, 1, W)
            inside = ((ys - cy).abs() <= ch // 2) & ((xs - cx).abs() <= cw // 2)
            x = x * (~inside).unsqueeze(1).to(x.dtype)
        return x


def _translate(x: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    B, C, H, W = x.shape
    dy = (ry.view(B) * (2 * round(H * ratio) + 1)).floor().long() - round(H * ratio)   # integer shifts
    dx = (rx.view(B) * (2 * round(W * ratio) + 1)).floor().long() - round(W * ratio)
    ys = torch.arange(H, device=x.device).view(1, H, 1) - dy.view(B, 1, 1)
    xs = torch.arange(W, device=x.device).view(1, 1, W) - dx.view(B, 1, 1)
    valid = ((ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)).unsqueeze(1)
    flat = (ys.clamp(0, H - 1) * W + xs.clamp(0, W - 1)).view(B, 1, H * W).expand(B, C, H * W)
    out = x.reshape(B, C, H * W).gather(2, flat).view(B, C, H, W)
    return out * valid.to(x.dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (radius 3 sigma); identity for sigma < 1/3.

    Runs as single-channel float32 convs on a contiguous (B*C, 1, H, W) view: oneDNN's JIT for bf16
    depthwise convs with long kernels on channels-last inputs never finishes generating its kernel.
    """
    radius = math.floor(3 * sigma)
    if radius < 1:
        return x
    B, C, H, W = x.shape
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp2(-(t / sigma).square())
    k = k / k.sum()
    with torch.autocast(x.device.type, enabled=False):
        y = F.pad(x.float().contiguous().view(B * C, 1, H, W), (radius, radius, radius, radius), mode='reflect')
        y = F.conv2d(F.conv2d(y, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
    return y.view(B, C, H, W)


# ---------------------------------------------------------------------- discriminators
def _norm(kind: str, channels: int) -> nn.Module:
    if kind == 'gn':
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels, eps=1e-6)
    if kind == 'bn':
        return nn.BatchNorm1d(channels, eps=1e-6)
    raise ValueError(f"discriminator norm must be 'gn' or 'bn', got {kind!r}")


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) * (1 / math.sqrt(2))


def _head_block(channels: int, kernel_size: int, norm: str, spectral: bool) -> nn.Sequential:
    conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode='circular')
    if spectral:
        conv = nn.utils.parametrizations.spectral_norm(conv)
    return nn.Sequential(conv, _norm(norm, channels), nn.LeakyReLU(0.2))


class DinoDiscriminator(nn.Module):
    """Trainable heads on a frozen DINOv2 ViT-S/14 (``dino_path``: the released ``dinov2_vits14`` weights).

    Images in [-1, 1] are ImageNet-normalised and brought to a multiple of 14 pixels (random crop or
    area resize, 50/50, when larger; bicubic resize when smaller). Tokens of each block in
    ``key_depths`` (patch tokens + class token) go through their own head; the output is the
    concatenation of all heads' per-token logits, (B, len(key_depths) * tokens).
    """

    def __init__(self, dino_path: str | None, image_size: int, key_depths=(0, 2, 5, 8, 11), kernel_size: int = 9,
                 norm: str = 'gn', spectral: bool = False):
        super().__init__()
        path = external_weights(dino_path, DINO_FILE, 'DINOv2 weights', (
            f"discriminator='dino' needs DINOv2 ViT-S/14 weights (got {dino_path!r}): pass loss.dino_path=PATH "
            f'({DINO_FILE}, a folder holding it, or the hub id {EXTERNAL_REPO}), or use loss.discriminator=patchgan'))
        self.grid = max(1, image_size // 14)
        # Kept out of the module tree: frozen, not in the state dict, the optimizer or DDP.
        self._dino = [load_dinov2(path, self.grid)]
        self.key_depths = tuple(key_depths)
        width = self._dino[0].embed_dim
        self.heads = nn.ModuleList(
            nn.Sequential(_head_block(width, 1, norm, spectral),
                          _Residual(_head_block(width, kernel_size, norm, spectral)),
                          nn.Conv1d(width, 1, 1))
            for _ in self.key_depths)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _apply(self, fn, recurse=True):
        self._dino[0]._apply(fn)             # follow .to(device) / .float() of the wrapper
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = ((x.float() + 1) / 2 - self.mean) / self.std
            side = self.grid * 14
            H, W = x.shape[-2:]
            if H > side and W > side:
                if random.random() < 0.5:
                    top, left = random.randint(0, H - side), random.randint(0, W - side)
                    x = x[..., top:top + side, left:left + side]
                else:
                    x = F.interpolate(x, size=(side, side), mode='area')
            elif (H, W) != (side, side):
                x = F.interpolate(x, size=(side, side), mode='bicubic', align_corners=False)
        feats = self._dino[0].forward_intermediates(x, indices=list(self.key_depths), return_prefix_tokens=True,
                                                    norm=False, output_fmt='NLC', intermediates_only=True)
        logits = [head((tokens + cls).float().transpose(1, 2)).flatten(1) for head, (tokens, cls) in zip(self.heads, feats)]
        return torch.cat(logits, dim=1)


def load_dinov2(path: str, grid: int) -> nn.Module:
    """Frozen timm DINOv2 ViT-S/14 (eval mode, no gradients) from the released ``dinov2_vits14``
    weights file, for ``grid`` x ``grid`` patches (``14 * grid`` px; position embeddings interpolated).
    The file is read without executing pickled code and must hold the released layout (the keys and
    shapes the official discriminator loads strictly): anything else is one CheckpointError."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    model = timm.create_model('vit_small_patch14_dinov2', pretrained=False, img_size=grid * 14, num_classes=0)
    state = read_state_dict(path, 'DINOv2 weights')
    pe = state.get('pos_embed')
    if pe is None or pe.dim() != 3 or pe.shape[0] != 1 or pe.shape[-1] != model.embed_dim:
        raise CheckpointError(f'DINOv2 weights {path!r} are not the released ViT-S/14 layout of {DINO_FILE}: '
                              f'pos_embed is {None if pe is None else tuple(pe.shape)}, expected (1, 1 + n, '
                              f'{model.embed_dim}); the file holds {len(state)} tensors, e.g. {sorted(state)[:4]}')
    if pe is not None and pe.shape[1] != 1 + grid * grid:
        # DINOv2's own interpolation (bicubic, scale factor with a 0.1 offset, no antialias), so that
        # features equal the reference implementation's at this resolution.
        side, _ = square_grid(pe.shape[1] - 1)
        patch = pe[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        patch = F.interpolate(patch, scale_factor=((grid + 0.1) / side,) * 2, mode='bicubic', antialias=False)
        state['pos_embed'] = torch.cat([pe[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)
    try:
        model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    except (RuntimeError, KeyError, AttributeError) as e:   # torch names every missing / unexpected key and wrong shape
        detail = ' '.join(str(e).split())[:400]
        raise CheckpointError(f'DINOv2 weights {path!r} are not the released ViT-S/14 layout of {DINO_FILE}: '
                              f'{detail}') from None
    return model.requires_grad_(False).eval()


class PatchGANDiscriminator(nn.Module):
    """pix2pix patch discriminator: 4x4 convs, stride 2 then 1, GroupNorm, LeakyReLU(0.2); (B, N) logits."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, num_layers + 1):
            c_out = channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.GroupNorm(32, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float()).flatten(1)


def build_discriminator(kind: str, image_size: int, dino_path: str | None = None) -> nn.Module | None:
    """``'dino'`` | ``'patchgan'`` | ``'none'`` | ``'auto'`` (DINO when ``dino_path`` is given, else PatchGAN)."""
    if kind == 'auto':
        kind = 'dino' if dino_path else 'patchgan'
    if kind == 'dino':
        return DinoDiscriminator(dino_path, image_size)
    if kind == 'patchgan':
        return PatchGANDiscriminator()
    if kind == 'none':
        return None
    raise ValueError(f"unknown discriminator {kind!r}; expected 'dino', 'patchgan', 'none' or 'auto'")
