"""Text side: open_clip's causal text transformer and BPE tokenizer (both offline)."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer


def build_text_tower(width: int, heads: int, layers: int, vocab_size: int, context_length: int,
                     embed_dim: int) -> TextTransformer:
    """open_clip ``TextTransformer`` as UniTok configures it: causal mask, EOT (argmax) pooling,
    exact-GELU MLPs of ratio 4, eps 1e-5 LayerNorms, a bias-free ``text_projection`` to ``embed_dim``."""
    return TextTransformer(
        context_length=context_length, vocab_size=vocab_size, width=width, heads=heads, layers=layers,
        mlp_ratio=4.0, output_dim=embed_dim, pool_type='argmax', proj_type='linear', proj_bias=False,
    )


@lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.LongTensor:
    """CLIP BPE token ids ``(N, context_length)``: SOT, tokens, EOT, zero padding (long texts are cut)."""
    if isinstance(texts, str):
        texts = [texts]
    if not all(isinstance(t, str) for t in texts):
        raise TypeError('tokenize expects a string or a sequence of strings')
    return _tokenizer(context_length)(list(texts), context_length=context_length)


def check_fits(texts: Sequence[str], context_length: int, what: str = 'text') -> None:
    """Refuse a text whose BPE tokens (plus start and end) exceed ``context_length``: the tower would read
    only its beginning."""
    tok = _tokenizer(context_length)
    for i, t in enumerate(texts):
        n = len(tok.encode(t)) + 2
        if n > context_length:
            raise ValueError(f'{what} {i} ({t[:40]!r}...) is {n} text tokens; the text tower reads at most '
                             f'{context_length} (start and end included): shorten it')


def text_ids(texts, context_length: int, vocab_size: int) -> torch.Tensor:
    """Token ids ``(N, context_length)`` from a string, a list of strings, or ids to check (integers in
    ``[0, vocab_size)``), with a clear error for anything else."""
    if isinstance(texts, str):
        return tokenize(texts, context_length)
    if isinstance(texts, torch.Tensor):
        if texts.dtype.is_floating_point or texts.dtype == torch.bool:
            raise TypeError(f'text token ids must be an integer tensor, got {texts.dtype}')
        if texts.dim() != 2 or texts.shape[1] != context_length:
            raise ValueError(f'text token ids must be (N, {context_length}), got {tuple(texts.shape)}')
        if texts.numel() and (int(texts.min()) < 0 or int(texts.max()) >= vocab_size):
            raise ValueError(f'text token ids must lie in [0, {vocab_size})')
        return texts
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        bad = type(texts).__name__ if not isinstance(texts, Sequence) else \
            f'a sequence holding {type(next(t for t in texts if not isinstance(t, str))).__name__}'
        raise TypeError(f'texts must be a string, a list of strings or token ids (N, {context_length}); got {bad}')
    if not texts:
        raise ValueError('texts is empty: pass at least one string')
    return tokenize(list(texts), context_length)
