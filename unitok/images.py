"""Image conversion between files / PIL / numpy and model tensors, and input checks.

Model tensors are float ``(B, 3, H, W)`` in ``[-1, 1]`` with H and W multiples of 16.
"""
from __future__ import annotations

import os
from typing import IO, Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')
PATCH = 16  # the encoder's total down-sampling factor


class ImageReadError(OSError):
    """An image file could not be read or decoded."""


def load_image(path: str | os.PathLike | IO[bytes], name: str | None = None) -> Image.Image:
    """Open an image (a path or a binary file object) as RGB (see :func:`to_rgb`), turned upright by
    its EXIF orientation (as cameras and viewers show it), or raise :class:`ImageReadError` naming
    it (``name``, default the path)."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:   # PIL's plugins raise many types on corrupt data (and DecompressionBombError)
        name = name or (repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else 'from a file object')
        raise ImageReadError(f'cannot read image {name}: {e}') from None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB copy of a PIL image in any mode; transparent pixels become white (emoji, clip art).

    ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` convert with PIL. Modes with
    alpha or a transparency key (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, ``P``/``L``/
    ``RGB`` with ``tRNS``) are composited on white. 16-bit integer modes (``I;16*``, and ``I``, which
    PIL uses for 16-bit PNG/TIFF data) scale 0..65535 to 0..255; ``F`` (float) must lie in [0, 1].
    Values outside those ranges raise ``ValueError`` instead of being clipped.
    """
    mode = im.mode
    if mode.startswith('I;16') or mode == 'I':
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f'{mode} image values in [{a.min()}, {a.max()}] are outside the 16-bit range '
                             '[0, 65535]; convert the image to 8 bits first')
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), 'L').convert('RGB')
    if mode == 'F':
        a = np.asarray(im, dtype=np.float64)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0, 0)
            raise ValueError(f'float (F) image values must be finite and in [0, 1], got [{lo:.4g}, {hi:.4g}]; '
                             'convert the image to 8 bits first')
        return Image.fromarray(np.round(a * 255).astype(np.uint8), 'L').convert('RGB')
    if mode == 'La':                        # premultiplied L + alpha: PIL has no direct conversion
        la = np.asarray(im).astype(np.float64)
        alpha = la[..., 1]
        grey = np.where(alpha > 0, la[..., 0] * 255 / np.maximum(alpha, 1), 0)
        im = Image.fromarray(np.stack([np.round(grey).clip(0, 255), alpha], -1).astype(np.uint8), 'LA')
    if im.has_transparency_data:
        rgba = im.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    try:
        return im.convert('RGB')
    except ValueError as e:
        raise ValueError(f'images of mode {mode!r} are not supported ({e})') from None


def resize_center_crop(im: Image.Image, size: int | tuple[int, int], crop_ratio: float = 1.0) -> Image.Image:
    """Resize the shorter side to ``size * crop_ratio`` (bicubic, antialiased) and centre-crop to ``size``."""
    th, tw = (size, size) if isinstance(size, int) else size
    w, h = im.size
    scale = max(th / h, tw / w) * crop_ratio
    new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
    if (new_w, new_h) != im.size:
        im = im.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - tw) // 2, (new_h - th) // 2
    return im.crop((left, top, left + tw, top + th))


def pad_to_multiple(x: torch.Tensor, multiple: int = PATCH, value: float = 1.0) -> torch.Tensor:
    """Pad (..., H, W) on the bottom/right up to multiples of ``multiple`` (white by default)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=value)
    return x


def _to_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise ValueError(f'numpy images must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}')
        if a.shape[-1] == 4:
            a = np.asarray(to_rgb(Image.fromarray(_as_uint8(a), 'RGBA')))
        return a
    raise TypeError(f'unsupported image type {type(image).__name__}; pass a path, PIL image or numpy array')


def _as_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:                # 16-bit data (e.g. cv2.IMREAD_UNCHANGED): 0..65535 -> 0..255
        return ((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError('image array contains NaN or inf')
        if a.min() < 0 or a.max() > 1:
            raise ValueError(f'float image arrays must be in [0, 1], got [{a.min():.3g}, {a.max():.3g}]')
        return np.round(a * 255).astype(np.uint8)
    raise TypeError(f'image arrays must be uint8, uint16 or float in [0, 1], got {a.dtype}')


def to_tensor(images: ImageLike | Sequence[ImageLike], size: int | tuple[int, int] | None = 256,
              resize: str = 'crop', crop_ratio: float = 1.0) -> torch.Tensor:
    """Convert images to a model batch ``(B, 3, H, W)`` in [-1, 1].

    Args:
        images: one or a list of paths, PIL images (any mode, see :func:`to_rgb`) or numpy arrays
            (HxW[x3|x4], uint8, uint16 or float in [0, 1]).
        size: target side (or (H, W)) for ``resize='crop'``.
        resize: ``'crop'``: shorter side to ``size * crop_ratio``, centre crop to ``size``;
            ``'pad'``: keep the native size and pad bottom/right with white to a multiple of 16;
            ``'none'``: keep the native size (must already be a multiple of 16).
        crop_ratio: >1 crops a margin (the official inference script uses 1.125).
    """
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    if isinstance(images, torch.Tensor):
        raise TypeError('to_tensor takes paths, PIL images or numpy arrays; a tensor is already a batch '
                        '(check it with unitok.images.check_images)')
    images = list(images)
    if not images:
        raise ValueError('to_tensor needs at least one image, got an empty list')
    if resize not in ('crop', 'pad', 'none'):
        raise ValueError(f"resize must be 'crop', 'pad' or 'none', got {resize!r}")
    if resize == 'crop':
        sides = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
        if len(sides) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
            raise ValueError(f"resize='crop' needs size = a positive int or (H, W) of positive ints, got {size!r}")
        if not (isinstance(crop_ratio, (int, float)) and crop_ratio >= 1):
            raise ValueError(f'crop_ratio must be a number >= 1, got {crop_ratio!r}')
    tensors = []
    for image in images:
        if resize == 'crop':
            pil = Image.fromarray(_as_uint8(_to_array(image)))
            a = np.asarray(resize_center_crop(pil, size, crop_ratio))
        else:
            a = _as_uint8(_to_array(image))
        t = torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        if resize == 'pad':
            t = pad_to_multiple(t)
        tensors.append(t)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f'images have different sizes {sorted(shapes)}; use resize="crop" or pass them one at a time')
    batch = torch.stack(tensors)
    check_images(batch)
    return batch


def to_uint8_tensor(images: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` in [-1, 1] -> uint8 tensor of the same shape and device: the pixels a PNG of the
    images holds (``round((x + 1) * 127.5)``, clamped; NaN -> mid grey). The one [-1, 1] -> uint8 rule."""
    x = images.detach().float().add(1).mul_(127.5).nan_to_num_(127.5).round_().clamp_(0, 255)
    return x.to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] -> uint8 array ``(B, H, W, 3)`` (see :func:`to_uint8_tensor`)."""
    if images.dim() == 3:
        images = images[None]
    return to_uint8_tensor(images).cpu().permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [-1, 1] -> list of PIL RGB images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def side_by_side(*batches: torch.Tensor) -> list[Image.Image]:
    """Concatenate same-sized image batches horizontally, image by image (e.g. input | reconstruction)."""
    return to_pil(torch.cat([b.detach().float().cpu() for b in batches], dim=-1))


def make_grid(rows: Iterable[torch.Tensor], pad: int = 2) -> Image.Image:
    """One PIL image with one row per batch (each ``(B, 3, H, W)`` in [-1, 1]), white padding."""
    import torchvision
    rows = [r.detach().float().cpu().clamp(-1, 1) for r in rows]
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=pad, pad_value=1.0)
    return to_pil(grid)[0]


def check_images(images: torch.Tensor, multiple: int = PATCH) -> None:
    """Raise one clear error if ``images`` is not a valid model batch."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f'images must be a torch.Tensor (B, 3, H, W); got {type(images).__name__} '
                        '(see unitok.images.to_tensor)')
    if images.dim() != 4:
        raise ValueError(f'images must be 4-D (B, 3, H, W), got shape {tuple(images.shape)}')
    if images.shape[1] != 3:
        raise ValueError(f'images must have 3 channels (RGB), got {images.shape[1]} in shape {tuple(images.shape)}')
    if not images.is_floating_point():
        raise TypeError(f'images must be a float tensor in [-1, 1], got {images.dtype} '
                        '(uint8 images: use unitok.images.to_tensor)')
    h, w = images.shape[-2:]
    if h == 0 or w == 0 or h % multiple or w % multiple:
        raise ValueError(f'image height and width must be positive multiples of {multiple}, got {h}x{w} '
                         f"(resize or pad them, e.g. unitok.images.to_tensor(..., resize='pad'))")
    if images.numel() == 0:
        raise ValueError('images batch is empty')
    lo, hi = torch.aminmax(images.detach())
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError('images contain NaN or inf values')
    if lo < -1.05 or hi > 1.05:
        raise ValueError(f'pixel values must be in [-1, 1], got [{lo:.3g}, {hi:.3g}] '
                         '(uint8 or [0, 1] images: use unitok.images.to_tensor)')
