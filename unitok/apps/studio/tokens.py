"""What the Tokenize and Sub-codebooks tabs compute: codes, reconstructions, code maps, mixes and drops.

Plain functions of the public API (``UniTok.encode`` / ``decode``, the ``unitok encode`` codes file):
the page shows what they return, and the tests call them to know what the page must show.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ...codes.npz import check_codes_match, read_codes_file, write_codes_file
from ...images import to_pil, to_tensor
from .limits import StudioInputError

MAP_SCALE = 8            # pixels per token in the drawn code maps


@dataclass
class Tokenized:
    """One image through the tokenizer."""
    input: torch.Tensor          # (1, 3, S, S) in [-1, 1], what the tokenizer saw
    codes: torch.Tensor          # (1, K, h, w) int64
    reconstruction: torch.Tensor  # (1, 3, S, S)
    psnr: float
    ssim: float
    png_bytes: int               # the input at the tokenizer's size, as a PNG


def model_input(tokenizer, image: Image.Image) -> torch.Tensor:
    """A PIL image -> ``(1, 3, S, S)`` at the tokenizer's size (shorter side resized, centre crop)."""
    return to_tensor(image, size=tokenizer.config.image_size)


def png_size(image: torch.Tensor) -> int:
    buffer = io.BytesIO()
    to_pil(image)[0].save(buffer, format='PNG', optimize=True)
    return buffer.tell()


def tokenize(tokenizer, image: Image.Image) -> Tokenized:
    """Encode, decode and measure one image."""
    from ...eval.metrics.reconstruction import psnr, ssim
    x = model_input(tokenizer, image)
    codes = tokenizer.encode(x)
    recon = tokenizer.decode(codes).clamp(-1, 1).float()
    return Tokenized(x, codes, recon, float(psnr(recon, x)[0]), float(ssim(recon, x)[0]), png_size(x))


def summary(t: Tokenized, codebook_size: int) -> str:
    """Markdown: tokens, bits, compression against the PNG, PSNR / SSIM."""
    _, K, h, w = t.codes.shape
    bits = K * h * w * math.log2(codebook_size)
    return (f'**{h} x {w} tokens x {K} sub-codes** = {K * h * w} codes of {math.log2(codebook_size):g} bits: '
            f'**{bits / 8:,.0f} bytes** per image. The input as PNG: {t.png_bytes:,} bytes, '
            f'so the codes are **{t.png_bytes * 8 / bits:,.1f}x** smaller.  \n'
            f'Reconstruction: PSNR **{t.psnr:.2f} dB**, SSIM **{t.ssim:.3f}**.')


def code_maps(codes: torch.Tensor, codebook_size: int, scale: int = MAP_SCALE) -> list[Image.Image]:
    """Codes ``(K, h, w)`` -> one RGB image per sub-codebook, a colour per code index (golden-ratio hues,
    so neighbouring indices get distant colours), ``scale`` pixels per token."""
    c = codes.cpu().numpy().astype(np.int64)
    hue = ((c * 0.6180339887) % 1.0 * 255).astype(np.uint8)
    sat = (160 + (c * 7919 % 96)).astype(np.uint8)
    val = (170 + (c * 104729 % 86)).astype(np.uint8)
    maps = []
    for k in range(c.shape[0]):
        hsv = np.stack([hue[k], sat[k], val[k]], axis=-1)
        im = Image.fromarray(hsv, 'HSV').convert('RGB')
        maps.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    return maps


def save_codes(path: str, tokenizer, codes: torch.Tensor, names: list[str]) -> None:
    """The codes ``(N, K, h, w)`` of ``tokenizer`` as the ``.npz`` that ``unitok decode`` reads."""
    write_codes_file(path, tokenizer, codes.cpu(), names, tokenizer.config.image_size, [], 'fp32')


def decode_codes_file(path: str, tokenizer) -> tuple[torch.Tensor, list[str]]:
    """Images ``(N, 3, S, S)`` and names of an uploaded codes file, refused when another tokenizer wrote it."""
    try:
        data = read_codes_file(path)
        check_codes_match('the uploaded file', data, tokenizer)
    except (ValueError, TypeError) as e:
        raise StudioInputError(str(e).replace(f'{path!r}', 'the uploaded file')) from None
    if data.codes.dim() != 4:
        raise StudioInputError('The codes file holds flat (N, K, L) codes; this page decodes (N, K, h, w) grids.')
    return tokenizer.decode(data.codes[:16]).clamp(-1, 1), data.files[:16]


def mix_codes(codes_a: torch.Tensor, codes_b: torch.Tensor, from_b) -> torch.Tensor:
    """Codes ``(1, K, h, w)`` whose sub-codebooks in ``from_b`` come from B, the others from A."""
    if codes_a.shape != codes_b.shape:
        raise StudioInputError(f'The two images give codes of different shapes {tuple(codes_a.shape)} and '
                               f'{tuple(codes_b.shape)}.')
    mixed = codes_a.clone()
    for k in from_b:
        mixed[:, k] = codes_b[:, k]
    return mixed


def drop_codebook(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Codes ``(B, K, h, w)`` with sub-codebook ``k`` replaced, per image, by its most frequent code there
    (ties: the smallest index): what the image looks like without what sub-codebook ``k`` carries."""
    dropped = codes.clone()
    for b in range(codes.shape[0]):
        values, counts = codes[b, k].unique(return_counts=True)
        dropped[b, k] = values[counts.argmax()]
    return dropped
