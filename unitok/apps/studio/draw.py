"""What the Generate tab computes: codes from the generator (class or text) or the MLLM (text), row by
row, with partial decodes; the same seed gives the codes of the library call with that seed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ...generation import generate, text_condition
from .limits import StudioInputError
from .streaming import stream_call

GREY = 0.0               # [-1, 1] value of the rows not sampled yet in a partial decode


@dataclass(frozen=True)
class DrawRequest:
    """One Generate request, checked (see ``ui``): ``source`` is 'generator' or 'mllm'."""
    source: str
    label: int | None            # class index (class-conditional generator)
    prompt: str | None           # text (text generator or MLLM)
    n: int
    guidance: float
    temperature: float
    top_k: int
    top_p: float
    seed: int

    def sampling(self) -> dict:
        """The keyword arguments of the library call."""
        return dict(cfg_scale=self.guidance, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    generator=self.seed)


def condition(models, req: DrawRequest):
    """The generator's condition for ``req``: ``n`` class labels, or the text condition of ``n`` prompts."""
    if models.text_generator:
        if req.prompt is None:
            raise StudioInputError('This generator is text-conditional: type a prompt.')
        return text_condition(models.tokenizer, [req.prompt] * req.n)
    if req.label is None:
        raise StudioInputError('Pick a class.')
    return torch.full((req.n,), req.label, dtype=torch.long)


def sample_codes(models, req: DrawRequest, callback=None) -> torch.Tensor:
    """The codes ``(n, K, h, w)`` of ``req``: exactly the library call with its seed."""
    if req.source == 'mllm':
        if models.mllm is None or req.prompt is None:
            raise StudioInputError('The MLLM draws from a text prompt: type one.')
        return models.mllm.generate_image(req.prompt, n=req.n, callback=callback, **req.sampling())
    if models.generator is None:
        raise StudioInputError('No generator is loaded.')
    return generate(models.generator, condition(models, req), callback=callback, **req.sampling())


def decoder(models, req: DrawRequest):
    """The tokenizer that decodes ``req``'s codes."""
    return models.mllm.image_tokenizer if req.source == 'mllm' else models.tokenizer


def partial_decode(tokenizer, partial: torch.Tensor, rows_done: int) -> torch.Tensor:
    """Images of codes with -1 where not sampled yet: those filled with code 0 for decoding, and the image
    rows of the token rows not sampled yet painted grey."""
    images = tokenizer.decode(partial.clamp_min(0)).clamp(-1, 1)
    h = partial.shape[-2]
    cut = images.shape[-2] * rows_done // h
    images[..., cut:, :] = GREY
    return images


def draw(models, req: DrawRequest) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """``(rows done, rows, images, codes or None)`` after each sampled row of tokens; the last has the codes."""
    h, w = sample_grid(models, req)

    def work(emit):
        def on_position(done, partial):
            if done % w == 0 and done < h * w:
                emit((done // w, partial))
        return sample_codes(models, req, on_position)

    tokenizer = decoder(models, req)
    for kind, value in stream_call(work):
        if kind == 'item':
            rows, partial = value
            with torch.inference_mode():
                yield rows, h, partial_decode(tokenizer, partial, rows), None
        else:
            with torch.inference_mode():
                yield h, h, tokenizer.decode(value).clamp(-1, 1), value


def sample_grid(models, req: DrawRequest) -> tuple[int, int]:
    model = models.mllm if req.source == 'mllm' else models.generator
    if model is None:
        raise StudioInputError('No model is loaded for this request.')
    return tuple(model.config.grid)
