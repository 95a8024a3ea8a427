"""Sampling codes from a :class:`~unitok.generation.GeneratorModel`.

:func:`generate` runs the backbone once over the condition prefix, then one position at a time
with static KV caches (allocated once per call) for the backbone and the depth head; the depth
head samples the K sub-codes of a position one after another. Classifier-free guidance runs the
conditional and the unconditional (null) branch as one batch and mixes the logits of every
sub-code step, ``u + s * (c - u)``. Logits are filtered and softmaxed in float32.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .gpt import Condition, GeneratorModel
from .layers import KVCache

CFG_SCHEDULES = ('constant', 'linear')


def guidance_scales(cfg_scale: float, num_positions: int, schedule: str = 'constant',
                    interval: tuple[int, int] | None = None) -> list[float]:
    """The guidance scale of each grid position.

    ``'constant'``: ``cfg_scale`` everywhere; ``'linear'``: from 1 at the first position to
    ``cfg_scale`` at the last. ``interval=(start, stop)`` keeps guidance only on positions
    ``start <= i < stop`` (scale 1 elsewhere).
    """
    if not isinstance(cfg_scale, (int, float)) or isinstance(cfg_scale, bool) or not math.isfinite(cfg_scale) \
            or cfg_scale < 0:
        raise ValueError(f'cfg_scale must be a finite number >= 0, got {cfg_scale!r}')
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f'cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}')
    L = num_positions
    if schedule == 'constant':
        scales = [float(cfg_scale)] * L
    else:
        scales = [1.0 + (cfg_scale - 1.0) * (i / (L - 1) if L > 1 else 1.0) for i in range(L)]
    if interval is not None:
        if not (isinstance(interval, (tuple, list)) and len(interval) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in interval)
                and 0 <= interval[0] <= interval[1]):
            raise ValueError(f'cfg_interval must be (start, stop) position indices with 0 <= start <= stop, '
                             f'got {interval!r}')
        scales = [s if interval[0] <= i < interval[1] else 1.0 for i, s in enumerate(scales)]
    return scales


def _per_codebook(name: str, value, K: int, kind: type) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * K
    if len(values) != K:
        raise ValueError(f'{name} must be one value or a list of {K} (one per sub-codebook), got {len(values)}')
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            raise TypeError(f'{name} values must be {kind.__name__}s, got {v!r}')
    return [kind(v) for v in values]


def sampling_arguments(temperature, top_k, top_p, K: int = 1) -> tuple[list[float], list[int], list[float]]:
    """The one check of the sampling arguments of every sampler (codes and text): each one value or a
    list of K (one per sub-code), returned as lists of K; errors name the argument."""
    temperature = _per_codebook('temperature', temperature, K, float)
    top_k, top_p = _per_codebook('top_k', top_k, K, int), _per_codebook('top_p', top_p, K, float)
    if min(temperature) < 0 or not all(math.isfinite(t) for t in temperature):
        raise ValueError(f'temperature must be finite and >= 0 (0: greedy), got {temperature}')
    if min(top_k) < 0:
        raise ValueError(f'top_k must be >= 0 (0: no top-k filter), got {top_k}')
    if not all(0 < p <= 1 for p in top_p):
        raise ValueError(f'top_p must be in (0, 1] (1: no nucleus filter), got {top_p}')
    return temperature, top_k, top_p


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (0: all) and the smallest set whose probability reaches
    ``top_p`` (1: all) of each row ``(N, V)``; the rest become ``-inf``. At least one stays."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                        # (N, 1)
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs                                  # mass strictly before each entry
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float('-inf'))
    return logits


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One code per row of ``logits (N, V)`` -> ``(N,)`` int64; ``temperature == 0`` is greedy (argmax)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class CodeSampler:
    """Guidance and per-sub-codebook sampling of one step's logits (N, V) -> codes (B,)."""

    def __init__(self, K, temperature, top_k, top_p, generator, guided):
        self.temperature, self.top_k, self.top_p = sampling_arguments(temperature, top_k, top_p, K)
        self.generator, self.guided = generator, guided

    def __call__(self, logits: torch.Tensor, k: int, scale: float) -> torch.Tensor:
        if self.guided:
            cond, uncond = logits.float().chunk(2)                         # (B, V) each
            logits = cond if scale == 1.0 else uncond + scale * (cond - uncond)
        return sample_logits(logits, self.temperature[k], self.top_k[k], self.top_p[k], self.generator)

    def both(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, ...) -> the batch of both branches (N, ...)."""
        return torch.cat([codes, codes]) if self.guided else codes


def sample_position(model: GeneratorModel, hidden: torch.Tensor, sampler: CodeSampler, scale: float,
                     head_cache: list[KVCache] | None) -> torch.Tensor:
    """Sub-codes ``(B, K)`` of one position from the backbone states ``hidden (N, dim)``."""
    head, K = model.head, model.config.num_codebooks
    if not head.sequential:
        logits = head(hidden)                                                   # (N, K, V)
        return torch.stack([sampler(logits[:, k], k, scale) for k in range(K)], dim=1)
    codes: list[torch.Tensor] = []
    x = head.first_input(hidden) if head_cache is not None else None
    for k in range(K):
        if head_cache is not None:
            logits = head.step(x, k, head_cache)                                # (N, V)
        else:
            prev = sampler.both(torch.stack(codes, 1)) if codes else hidden.new_zeros(hidden.shape[0], 0).long()
            logits = head.logits_upto(hidden, prev)[:, -1]                      # (N, V), recomputes steps 0..k
        codes.append(sampler(logits, k, scale))
        if head_cache is not None and k < K - 1:
            x = head.code_input(sampler.both(codes[-1]), k + 1)
    return torch.stack(codes, dim=1)                                            # (B, K)


def _compute_dtype(model: GeneratorModel, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.code_embed.weight.dtype


def generate(model: GeneratorModel, cond: Condition, grid: tuple[int, int] | None = None, *,
             cfg_scale: float = 1.0, cfg_schedule: str = 'constant', cfg_interval: tuple[int, int] | None = None,
             temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
             top_p: float | Sequence[float] = 1.0, generator: torch.Generator | int | None = None,
             use_cache: bool = True, batch_uncond: bool | None = None,
             callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Sample codes for a batch of conditions.

    Args:
        model: the generator (switched to eval mode for the call).
        cond: class labels ``(B,)`` or a text condition ``(features, mask)`` (see :mod:`unitok.generation.gpt`).
        grid: ``(h, w)``; must be the model's grid (the default).
        cfg_scale, cfg_schedule, cfg_interval: classifier-free guidance, see :func:`guidance_scales`.
            Guidance-free when every scale is 1: the unconditional branch is then not run at all.
        temperature, top_k, top_p: one value, or a list of K (one per sub-codebook). Temperature 0
            is greedy; ``top_k=0`` and ``top_p=1`` switch the filters off.
        generator: a ``torch.Generator`` on the model's device, or an int seed; None: torch's global RNG.
        use_cache: static KV caches (else every step recomputes the whole sequence; same codes, slower).
        batch_uncond: run the unconditional branch even where every scale is 1 (None: only when needed).
        callback: called after each grid position (raster order) as ``callback(done, partial)``: ``done``
            positions sampled so far (1..h*w) and ``partial``, a copy of the codes ``(B, K, h, w)`` with
            ``-1`` at the positions not sampled yet (progress bars, partial decodes). It does not change
            the codes: the same seed gives the same codes with or without it.
    Returns:
        codes ``(B, K, h, w)`` int64, for ``UniTok.decode``.
    """
    c = model.config
    if grid is not None and (not isinstance(grid, (tuple, list)) or tuple(grid) != c.grid):
        raise ValueError(f'grid must be the generator grid {c.grid}, got {grid!r}')
    h, w = c.grid
    L, K = h * w, c.num_codebooks
    cond = model.check_condition(cond)
    B = cond.shape[0] if isinstance(cond, torch.Tensor) else cond[0].shape[0]
    scales = guidance_scales(cfg_scale, L, cfg_schedule, cfg_interval)
    guided = bool(batch_uncond) or (batch_uncond is None and any(s != 1.0 for s in scales))
    device = model.device
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator(device).manual_seed(generator)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f'generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}')
    sampler = CodeSampler(K, temperature, top_k, top_p, generator, guided)
    if callback is not None and not callable(callback):
        raise TypeError(f'callback must be callable or None, got {type(callback).__name__}')
    report = None if callback is None else lambda done, out: callback(done, partial_codes(out, done, (h, w)))

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if guided:
                null = model.null_condition(B)
                cond = torch.cat([cond, null]) if isinstance(cond, torch.Tensor) else \
                    (torch.cat([cond[0], null[0].to(cond[0].dtype)]), torch.cat([cond[1], null[1]]))
            seq = _generate_cached(model, cond, sampler, scales, report) if use_cache else \
                _generate_uncached(model, cond, sampler, scales, report)
    finally:
        model.train(was_training)
    return seq.transpose(1, 2).reshape(B, K, h, w).clone()                      # (B, L, K) -> (B, K, h, w); a normal tensor


def partial_codes(out: torch.Tensor, done: int, grid: tuple[int, int]) -> torch.Tensor:
    """Sequence ``out (B, L, K)`` with its first ``done`` positions sampled -> codes ``(B, K, h, w)``, -1 elsewhere."""
    partial = out.clone()
    partial[:, done:] = -1
    return partial.transpose(1, 2).reshape(out.shape[0], out.shape[2], *grid)


def _generate_cached(model: GeneratorModel, cond: Condition, sampler: CodeSampler, scales: list[float],
                     report=None) -> torch.Tensor:
    L, K = len(scales), model.config.num_codebooks
    prefix, prefix_mask = model.condition_prefix(cond)                          # (N, P, dim)
    N, P = prefix.shape[:2]
    B = N // 2 if sampler.guided else N
    device = prefix.device
    dtype = _compute_dtype(model, device)
    cos, sin = model.rope_tables(L - 1)                                         # (P + L - 1, hd/2)
    key_mask = None
    if prefix_mask is not None:
        key_mask = torch.cat([prefix_mask, prefix_mask.new_ones(N, L - 1)], dim=1)   # (N, P + L - 1)
    caches = model.allocate_caches(N, P + L - 1, dtype, device)
    head_cache = model.head.allocate_cache(N, dtype, device) if model.head.sequential else None
    out = torch.empty(B, L, K, dtype=torch.long, device=device)
    x, start = prefix, 0
    for i in range(L):
        T = x.shape[1]
        hidden = model.backbone(x, (cos[start:start + T], sin[start:start + T]), key_mask, caches, start)
        out[:, i] = sample_position(model, hidden[:, -1], sampler, scales[i], head_cache)
        if report is not None:
            report(i + 1, out)
        start += T
        if i < L - 1:
            x = model.embed_codes(sampler.both(out[:, i:i + 1]))                # (N, 1, dim)
    return out


def _generate_uncached(model: GeneratorModel, cond: Condition, sampler: CodeSampler, scales: list[float],
                       report=None) -> torch.Tensor:
    L, K = len(scales), model.config.num_codebooks
    N = cond.shape[0] if isinstance(cond, torch.Tensor) else cond[0].shape[0]
    B = N // 2 if sampler.guided else N
    out = torch.empty(B, L, K, dtype=torch.long, device=model.device)
    for i in range(L):
        hidden = model.hidden_states(sampler.both(out[:, :i]), cond)[:, -1]     # (N, dim): whole sequence again
        out[:, i] = sample_position(model, hidden, sampler, scales[i], None)
        if report is not None:
            report(i + 1, out)
    return out
