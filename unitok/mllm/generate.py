"""Sampling from a :class:`~unitok.mllm.UniTokMLLM`: answers (text) and images (codes).

Both run the LLM once over the prompt and then one position at a time with the LLM's own KV cache
(``transformers`` ``DynamicCache`` through ``past_key_values``); image positions also use the depth
head's static cache (:meth:`DepthHead.allocate_cache`). ``use_cache=False`` recomputes the whole
sequence at every step instead (same results, for checking and benchmarks). Prompts of different
lengths (a batch, or a prompt and the null prompt of classifier-free guidance) are left-padded,
with the attention mask and position ids that make padding invisible.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..generation.sampling import (
    CodeSampler, guidance_scales, partial_codes, sample_logits, sample_position, sampling_arguments,
)


def _seeded(generator, device) -> torch.Generator | None:
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device).manual_seed(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f'generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}')
    return generator


def _left_pad(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def _new_cache(model):
    from transformers import DynamicCache
    return DynamicCache(config=model.llm.config)


def _dtype(model) -> torch.dtype:
    if torch.is_autocast_enabled(model.device.type):
        return torch.get_autocast_dtype(model.device.type)
    return model.head.pos_embed.dtype


class _Eval:
    """Eval mode and inference mode for the duration of a call."""

    def __init__(self, model):
        self.model, self.mode = model, torch.inference_mode()

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.model.train(self.was)


def generate_codes(model, rows: list[list[int]], *, cfg_scale: float = 1.0, temperature=1.0, top_k=0, top_p=1.0,
                   generator=None, use_cache: bool = True, callback=None) -> torch.Tensor:
    """Codes ``(B, K, h, w)`` for prompts given as token ids ending with ``<boi>`` (one row per sample);
    ``callback(done, partial)`` after each position, as in :func:`unitok.generation.generate`."""
    c = model.config
    L, K = c.num_positions, c.num_codebooks
    scales = guidance_scales(cfg_scale, L)
    guided = any(s != 1.0 for s in scales)
    device = model.device
    sampler = CodeSampler(K, temperature, top_k, top_p, _seeded(generator, device), guided)
    B = len(rows)
    if callback is not None and not callable(callback):
        raise TypeError(f'callback must be callable or None, got {type(callback).__name__}')
    report = None if callback is None else lambda done, out: callback(done, partial_codes(out, done, c.grid))
    if guided:
        rows = list(rows) + [model.generation_prompt(None)] * B
    with _Eval(model):
        ids, mask = _left_pad(rows, device)
        out = torch.empty(B, L, K, dtype=torch.long, device=device)
        if use_cache:
            _codes_cached(model, ids, mask, sampler, scales, out, report)
        else:
            _codes_uncached(model, ids, mask, sampler, scales, out, report)
    return out.transpose(1, 2).reshape(B, K, *c.grid).clone()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _codes_cached(model, ids, mask, sampler, scales, out, report=None) -> None:
    N = ids.shape[0]
    head_dtype = model.head.pos_embed.dtype
    cache = _new_cache(model)
    head_cache = model.head.allocate_cache(N, _dtype(model), model.device)
    pos = _positions(mask)
    h = model.hidden_states(model.embed(ids), mask, pos, cache)[:, -1]
    for i in range(len(scales)):
        out[:, i] = sample_position(model, h.to(head_dtype), sampler, scales[i], head_cache)
        if report is not None:
            report(i + 1, out)
        if i < len(scales) - 1:
            x = model.next_image_embeds(sampler.both(out[:, :i + 1])).to(h.dtype)   # (N, 1, C)
            mask = torch.cat([mask, mask.new_ones(N, 1)], dim=1)
            pos = pos[:, -1:] + 1
            h = model.hidden_states(x, mask, pos, cache)[:, -1]


def _codes_uncached(model, ids, mask, sampler, scales, out, report=None) -> None:
    N, P = ids.shape
    K = model.config.num_codebooks
    head_dtype = model.head.pos_embed.dtype
    for i in range(len(scales)):
        full_ids = torch.cat([ids, ids.new_zeros(N, i)], dim=1)
        image = torch.zeros_like(full_ids, dtype=torch.bool)
        image[:, P:] = True
        codes = torch.zeros(N, P + i, K, dtype=torch.long, device=ids.device)
        codes[:, P:] = sampler.both(out[:, :i])
        full_mask = torch.cat([mask, mask.new_ones(N, i)], dim=1)
        x = model.embed(full_ids, image, codes, generated=True)
        h = model.hidden_states(x, full_mask, _positions(full_mask))[:, -1]
        out[:, i] = sample_position(model, h.to(head_dtype), sampler, scales[i], None)
        if report is not None:
            report(i + 1, out)


def generate_text(model, example: dict, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, generator=None, stream: Callable[[str], None] | None = None,
                  use_cache: bool = True) -> list[int]:
    """Token ids of the answer to one example (``understanding_example`` without answer), up to the
    end-of-turn / EOS token (not included) or ``max_new_tokens``."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f'max_new_tokens must be an int >= 1, got {max_new_tokens!r}')
    (temperature,), (top_k,), (top_p,) = sampling_arguments(temperature, top_k, top_p)
    device = model.device
    gen = _seeded(generator, device)
    stops = model._stop | {model._end_of_turn}
    tok = model.text_tokenizer
    answer: list[int] = []
    shown = ''
    with _Eval(model):
        ids = example['input_ids'][None].to(device)
        image = example['image_mask'][None].to(device)
        codes = example['codes'][None].to(device)
        mask = torch.ones_like(ids)
        cache = _new_cache(model) if use_cache else None
        x = model.embed(ids, image, codes)
        h = model.hidden_states(x, mask, _positions(mask), cache)[:, -1]
        for _ in range(max_new_tokens):
            logits = model.text_logits(h).float()
            nxt = sample_logits(logits, temperature, top_k, top_p, gen)           # (1,)
            t = int(nxt)
            if t in stops:
                break
            answer.append(t)
            if stream is not None:
                text = tok.decode(answer, skip_special_tokens=True)
                if not text.endswith('\ufffd'):                 # wait for the rest of a multi-byte character
                    stream(text[len(shown):])
                    shown = text
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            if use_cache:
                x = model.embed(nxt[:, None])
                h = model.hidden_states(x, mask, _positions(mask)[:, -1:], cache)[:, -1]
            else:
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                image = torch.cat([image, image.new_zeros(1, 1)], dim=1)
                codes = torch.cat([codes, codes.new_zeros(1, 1, codes.shape[2])], dim=1)
                h = model.hidden_states(model.embed(ids, image, codes), mask, _positions(mask))[:, -1]
    if stream is not None:
        text = tok.decode(answer, skip_special_tokens=True)
        if text[len(shown):]:
            stream(text[len(shown):])
    return answer
