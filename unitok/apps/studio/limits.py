"""What the studio accepts from a browser: upload caps (bytes, pixels), prompt and label lengths, numbers.

Every check raises :class:`StudioInputError` with one sentence the page shows; nothing here decodes
more than an image header before the caps are checked.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

from PIL import Image

from ...images import ImageReadError, load_image


class StudioInputError(ValueError):
    """Input from the page that the studio refuses (the message is shown in the page)."""


@dataclass(frozen=True)
class StudioLimits:
    """Caps on what one request may ask for (``unitok studio --max-upload-mb`` etc.)."""
    max_upload_mb: float = 20.0          # bytes of one uploaded file
    max_pixels: int = 40_000_000         # width x height of one uploaded image, checked from its header
    max_prompt_chars: int = 1000         # prompts, questions and the label list
    max_labels: int = 100                # zero-shot labels
    max_images: int = 8                  # images per generation request
    max_new_tokens: int = 128            # chat answer length
    queue_size: int = 16                 # requests waiting in gradio's queue; more get the queue-full message
    output_max_age_s: float = 3600.0     # request folders (codes files, PNGs) older than this are removed

    def __post_init__(self):
        for name in ('max_upload_mb', 'max_pixels', 'max_prompt_chars', 'max_labels', 'max_images',
                     'max_new_tokens', 'queue_size', 'output_max_age_s'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f'{name} must be a positive number, got {value!r}')

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def read_image(path: str | None, limits: StudioLimits, what: str = 'the image') -> Image.Image:
    """An uploaded file (a path in gradio's upload cache) as 8-bit RGB, after the byte and pixel caps."""
    if not path:
        raise StudioInputError(f'No image: upload, paste or pick one for {what}.')
    size = os.path.getsize(path)
    if size > limits.max_upload_bytes:
        raise StudioInputError(f'{what.capitalize()} is {size / 2**20:.1f} MB; the limit is '
                               f'{limits.max_upload_mb:g} MB.')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)     # our own cap follows
            with Image.open(path) as im:                # the header only: the pixel cap before decoding
                w, h = im.size
    except Image.DecompressionBombError:
        raise StudioInputError(f'{what.capitalize()} has too many pixels; the limit is '
                               f'{limits.max_pixels / 1e6:g} megapixels.') from None
    except Exception:    # PIL raises many types on data that is no image
        raise StudioInputError(f'{what.capitalize()} is not an image file PIL can read (PNG, JPEG, WebP, ...).') \
            from None
    if w * h > limits.max_pixels:
        raise StudioInputError(f'{what.capitalize()} is {w} x {h} = {w * h / 1e6:.0f} megapixels; the limit is '
                               f'{limits.max_pixels / 1e6:g} megapixels.')
    try:
        return load_image(path, name=what)
    except (ImageReadError, ValueError) as e:
        raise StudioInputError(str(e)) from None


def check_text(text, limits: StudioLimits, what: str = 'the prompt') -> str:
    """A non-empty text within the length cap, stripped."""
    if not isinstance(text, str) or not text.strip():
        raise StudioInputError(f'{what.capitalize()} is empty: type some text.')
    if len(text) > limits.max_prompt_chars:
        raise StudioInputError(f'{what.capitalize()} has {len(text):,} characters; the limit is '
                               f'{limits.max_prompt_chars:,}.')
    return text.strip()


def check_labels(text, limits: StudioLimits) -> list[str]:
    """Comma- or newline-separated zero-shot labels: at least two distinct, at most ``max_labels``."""
    text = check_text(text, limits, 'the label list')
    labels = list(dict.fromkeys(s.strip() for s in text.replace('\n', ',').split(',') if s.strip()))
    if len(labels) < 2:
        raise StudioInputError('Type at least two labels, separated by commas.')
    if len(labels) > limits.max_labels:
        raise StudioInputError(f'{len(labels)} labels; the limit is {limits.max_labels}.')
    return labels


def check_number(value, name: str, low: float, high: float, integer: bool = False) -> float | int:
    """A finite number in ``[low, high]`` (an int when ``integer``): sliders and boxes can be bypassed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StudioInputError(f'{name} must be a finite number, got {value!r}.')
    if not low <= value <= high:
        raise StudioInputError(f'{name} must lie in [{low:g}, {high:g}], got {value:g}.')
    if integer:
        if value != int(value):
            raise StudioInputError(f'{name} must be a whole number, got {value:g}.')
        return int(value)
    return float(value)
