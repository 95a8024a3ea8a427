"""GeneratorModel: a decoder-only transformer over UniTok's multi-codebook code grid.

LlamaGen-style (Sun et al., 2024, arXiv 2406.06525; UniTok's generation experiments use it, see
github.com/FoundationVision/UniTok ``eval/llamagen``): RMSNorm, SwiGLU, 2-D rotary positions over the
token grid, the condition as a prefix. Sequence layout (P prefix tokens, L = h*w grid positions)::

    index:   0 .. P-1           P          P+1        ...  P+L-2
    input:   condition prefix   codes[0]   codes[1]   ...  codes[L-2]      (sum of K sub-code embeddings)
    output:  hidden P-1 .. P+L-2 predict codes[0] .. codes[L-1] through the output head

Rotary positions: the input token ``codes[i]`` sits at grid position ``(i // w, i % w)``; the head
dim is split in halves for row and column. Prefix tokens get the identity rotation (grid position
(0, 0)) by default, or zeroed queries/keys (``prefix_rope='zero'``, what LlamaGen does). Text
prefixes carry a padding mask: captions are moved to the end of the prefix (left padding, so the
state that predicts ``codes[0]`` belongs to a real token) and no token attends to padded positions.

Conditions (``cond``):
    * ``'class'``: int64 labels ``(B,)`` in ``[0, num_classes)``; row ``num_classes`` of the class
      table is the learned null class (classifier-free guidance).
    * ``'text'``: ``(features (B, text_len, text_dim), mask (B, text_len) bool or None)``, the
      per-token features of UniTok's own text tower (:func:`text_condition`); the null text is a
      learned feature sequence with a full mask.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..pretrained import Pretrained
from .config import GeneratorConfig, ffn_hidden_dim
from .heads import DepthHead, ParallelHead
from .layers import Block, KVCache, RMSNorm, rope_2d

# A condition: class labels (B,), or text (features (B, T, C), mask (B, T) bool or None).
Condition = Union[torch.Tensor, tuple]


class ClassEmbedder(nn.Module):
    """Class labels ``(B,)`` -> ``tokens`` prefix tokens ``(B, tokens, dim)``; row ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, dim: int, tokens: int = 1):
        super().__init__()
        self.num_classes, self.tokens = num_classes, tokens
        self.table = nn.Embedding(num_classes + 1, tokens * dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels).view(labels.shape[0], self.tokens, -1)           # (B, tokens, dim)


class TextEmbedder(nn.Module):
    """Text-tower token features ``(B, T, text_dim)`` -> prefix ``(B, T, dim)`` through a GELU MLP;
    ``null`` is the learned unconditional feature sequence ``(text_len, text_dim)``."""

    def __init__(self, text_dim: int, dim: int, text_len: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, dim, bias=False), nn.GELU(approximate='tanh'),
                                  nn.Linear(dim, dim, bias=False))
        self.null = nn.Parameter(torch.zeros(text_len, text_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class GeneratorModel(Pretrained, nn.Module):
    """Autoregressive generator of UniTok codes ``(B, K, h, w)`` given a class label or a text.

    Stages: :meth:`condition_prefix` (condition -> prefix tokens), :meth:`embed_codes` (codes ->
    summed sub-code embeddings), :meth:`backbone` (transformer, optional KV caches), ``head``
    (:class:`DepthHead` or :class:`ParallelHead`). :meth:`forward` composes them teacher-forced,
    :meth:`loss` is the training objective; sampling lives in :func:`unitok.generation.generate`.
    """
    config_class = GeneratorConfig
    weights_format = 'unitok-generator'
    model_kind = 'generator model'

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        K, V = c.num_codebooks, c.codebook_size
        if c.cond == 'class':
            self.cond_embed: nn.Module = ClassEmbedder(c.num_classes, c.dim, c.class_tokens)
        else:
            self.cond_embed = TextEmbedder(c.text_dim, c.dim, c.text_len)
        self.code_embed = nn.Embedding(K * V, c.dim)               # K stacked sub-codebook tables
        self.token_drop = nn.Dropout(c.token_dropout)
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]    # stochastic depth ramp
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.ffn_dim, c.norm_eps, c.dropout, c.attn_dropout, r)
                                    for r in rates)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if c.head == 'depth':
            self.head: nn.Module = DepthHead(
                c.dim, c.depth_head_width, c.head_depth, c.depth_head_num_heads,
                ffn_hidden_dim(c.depth_head_width, c.mlp_ratio, c.ffn_multiple_of), K, V, c.norm_eps, c.dropout, c.attn_dropout)
        else:
            self.head = ParallelHead(c.dim, K, V)
        self.register_buffer('code_offsets', torch.arange(K) * V, persistent=False)
        self.init_weights()

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_preset(cls, name: str, **overrides) -> 'GeneratorModel':
        """A randomly initialised model from a preset (see ``GENERATOR_PRESETS``) plus config overrides."""
        return cls(GeneratorConfig.from_preset(name, **overrides))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) linears and embeddings, unit norms; zero output matrices (every code
        equally likely at the start), zero depth-head position embeddings, null text features N(0, 1/text_dim)."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for name in ('weight', 'bias'):
            nn.init.zeros_(getattr(self.head, name))
        if isinstance(self.head, DepthHead):
            nn.init.zeros_(self.head.pos_embed)
        if isinstance(self.cond_embed, TextEmbedder):
            nn.init.normal_(self.cond_embed.null, std=self.config.text_dim ** -0.5)

    @torch.no_grad()
    def init_code_embeddings(self, code_vectors: torch.Tensor, seed: int = 0) -> None:
        """Initialise the input embeddings from the tokenizer's code vectors.

        ``code_vectors``: ``(K, V, d)``, e.g. ``tokenizer.quantizer.code_table()``. The
        embedding of code v of sub-codebook k is ``code_vectors[k, v] @ P_k`` with a fixed random
        projection ``P_k (d, dim)``, scaled to std ``init_std``: the summed input embedding is then a
        linear image of the quantized latent, so similar latents start with similar embeddings.
        """
        K, V = self.config.num_codebooks, self.config.codebook_size
        if not isinstance(code_vectors, torch.Tensor) or code_vectors.dim() != 3 \
                or tuple(code_vectors.shape[:2]) != (K, V):
            got = tuple(code_vectors.shape) if isinstance(code_vectors, torch.Tensor) else type(code_vectors).__name__
            raise ValueError(f'code_vectors must be ({K}, {V}, d) for this generator, got {got}')
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(K, code_vectors.shape[2], self.config.dim, generator=g, dtype=torch.float64)
        emb = torch.einsum('kvd,kde->kve', code_vectors.detach().cpu().double(), proj)   # (K, V, dim)
        emb = emb * (self.config.init_std / emb.std().clamp_min(1e-12))
        self.code_embed.weight.copy_(emb.reshape(K * V, -1))

    def _take_state(self, state, map_location, **options) -> None:
        self.load_state_dict(state, strict=True, assign=True)
        c, device = self.config, self.code_embed.weight.device        # the non-persistent buffers
        self.code_offsets = torch.arange(c.num_codebooks, device=device) * c.codebook_size
        if isinstance(self.head, DepthHead):
            self.head.offsets = torch.arange(c.num_codebooks - 1, device=device) * c.codebook_size

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (``cond_embed``, ``code_embed``, ``blocks``, ``head``, ...) and ``total``."""
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in self.named_children()}
        counts['total'] = sum(p.numel() for p in self.parameters())
        return counts

    @property
    def device(self) -> torch.device:
        return self.code_embed.weight.device

    # ------------------------------------------------------------------ input checks
    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Validate codes ``(B, K, h, w)`` of this generator's grid; return the sequence ``(B, L, K)`` int64."""
        c = self.config
        K, V, (h, w) = c.num_codebooks, c.codebook_size, c.grid
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f'codes must be a torch.Tensor (B, {K}, {h}, {w}), got {type(codes).__name__}')
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise TypeError(f'codes must be an integer tensor, got {codes.dtype}')
        if codes.dim() != 4 or codes.shape[0] == 0:
            raise ValueError(f'codes must be (B, {K}, {h}, {w}) with B > 0, got {tuple(codes.shape)}')
        if codes.shape[1] != K:
            raise ValueError(f'codes have {codes.shape[1]} sub-codebooks, the generator models {K} '
                             '(codes of another tokenizer?)')
        if tuple(codes.shape[2:]) != (h, w):
            raise ValueError(f'codes have grid {codes.shape[2]}x{codes.shape[3]}, the generator models {h}x{w}')
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= V:
            raise ValueError(f'codes must lie in [0, {V}), got values in [{lo}, {hi}] (codes of another tokenizer?)')
        return codes.long().flatten(2).transpose(1, 2).to(self.device)          # (B, L, K)

    def check_condition(self, cond: Condition, batch: int | None = None) -> Condition:
        """Validate a condition (see the module docstring); return it on the model's device."""
        c = self.config
        if c.cond == 'class':
            if not isinstance(cond, torch.Tensor) or cond.dtype.is_floating_point or cond.dtype == torch.bool:
                raise TypeError(f'a class-conditional generator takes int64 class labels (B,), got '
                                f'{cond.dtype if isinstance(cond, torch.Tensor) else type(cond).__name__}')
            if cond.dim() != 1 or cond.numel() == 0:
                raise ValueError(f'class labels must be a non-empty 1-D tensor (B,), got shape {tuple(cond.shape)}')
            lo, hi = int(cond.min()), int(cond.max())
            if lo < 0 or hi >= c.num_classes:
                raise ValueError(f'class labels must lie in [0, {c.num_classes}), got values in [{lo}, {hi}]')
            out: Condition = cond.long().to(self.device)
            n = cond.shape[0]
        else:
            if not isinstance(cond, (tuple, list)) or len(cond) != 2 or not isinstance(cond[0], torch.Tensor):
                raise TypeError('a text-conditional generator takes (features (B, T, C), mask (B, T) or None), '
                                'see unitok.generation.text_condition')
            features, mask = cond
            if features.dim() != 3 or features.shape[0] == 0 or tuple(features.shape[1:]) != (c.text_len, c.text_dim) \
                    or not features.dtype.is_floating_point:
                raise ValueError(f'text features must be float (B, {c.text_len}, {c.text_dim}), got '
                                 f'{features.dtype} {tuple(features.shape)}')
            if not torch.isfinite(features).all():
                raise ValueError('text features contain NaN or inf')
            n = features.shape[0]
            if mask is None:
                mask = torch.ones(n, c.text_len, dtype=torch.bool)
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n, c.text_len):
                raise ValueError(f'text mask must be a tensor ({n}, {c.text_len}), got '
                                 f'{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}')
            mask = mask.bool()
            count = mask.sum(dim=1, keepdim=True)
            if not mask[:, 0].all() or not torch.equal(mask, torch.arange(c.text_len)[None, :] < count):
                raise ValueError('text mask must be True for the first tokens of each caption (at least the start '
                                 'token) and False after them, as right-padded tokenization gives')
            out = (features.to(self.device), mask.to(self.device))
        if batch is not None and n != batch:
            raise ValueError(f'the condition holds {n} entries, the codes {batch}')
        return out

    # ------------------------------------------------------------------ stages
    def null_condition(self, batch: int) -> Condition:
        """The unconditional condition (null class / null text) for ``batch`` samples."""
        c = self.config
        if c.cond == 'class':
            return torch.full((batch,), c.num_classes, dtype=torch.long, device=self.device)
        return (self.cond_embed.null.expand(batch, -1, -1),
                torch.ones(batch, c.text_len, dtype=torch.bool, device=self.device))

    def condition_prefix(self, cond: Condition, drop: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A checked condition -> ``(prefix (B, P, dim), prefix key mask (B, P) bool or None)``.

        ``drop`` ``(B,)`` bool replaces those entries by the null condition (classifier-free guidance
        training). Labels equal to ``num_classes`` (the null class) are accepted here.
        """
        if self.config.cond == 'class':
            labels = cond if drop is None else torch.where(drop, self.config.num_classes, cond)
            return self.cond_embed(labels), None
        features, mask = cond
        if drop is not None:
            null = self.cond_embed.null.to(features.dtype)
            features = torch.where(drop[:, None, None], null, features)
            mask = mask | drop[:, None]
        if bool(mask.all()):
            return self.cond_embed(features), None
        # Left-pad: move each caption's valid tokens to the end of the prefix, so that the last prefix
        # position (whose state predicts the first code) is always a real token.
        T = mask.shape[1]
        shift = T - mask.sum(dim=1, keepdim=True)                                   # (B, 1) padded tokens
        pos = torch.arange(T, device=mask.device)[None, :]
        source = (pos - shift) % T                                                  # (B, T)
        features = features.gather(1, source[..., None].expand(-1, -1, features.shape[2]))
        return self.cond_embed(features), pos >= shift

    def embed_codes(self, seq: torch.Tensor) -> torch.Tensor:
        """Sequence ``(B, T, K)`` -> sum of the K sub-code embeddings ``(B, T, dim)``."""
        return self.code_embed(seq + self.code_offsets).sum(dim=2)              # (B, T, K, dim) -> (B, T, dim)

    def rope_tables(self, num_tokens: int, grid: tuple[int, int] | None = None, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary ``(cos, sin)`` ``(P + num_tokens, head_dim/2)`` for the prefix followed by codes 0 .. num_tokens-1."""
        c = self.config
        h, w = grid or c.grid
        dtype = dtype or torch.promote_types(self.code_embed.weight.dtype, torch.float32)
        i = torch.arange(num_tokens, device=self.device)
        cos, sin = rope_2d(i // w, i % w, c.dim // c.num_heads, c.rope_base, dtype)
        P = c.prefix_len
        pre_cos = (torch.ones if c.prefix_rope == 'identity' else torch.zeros)(P, cos.shape[1], dtype=dtype,
                                                                                  device=self.device)
        return torch.cat([pre_cos, cos]), torch.cat([torch.zeros_like(pre_cos), sin])

    def backbone(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None = None,
                 caches: Sequence[KVCache] | None = None, start: int = 0) -> torch.Tensor:
        """Transformer over tokens ``x`` ``(B, T, dim)`` at sequence positions ``start .. start+T-1``.

        Args:
            rope: tables of those positions, ``(T, head_dim/2)`` each.
            key_mask: ``(B, >= start+T)`` bool, False at padded prefix positions; None: no padding.
            caches: one :class:`KVCache` per block (then earlier positions come from the cache).
        Returns:
            normed hidden states ``(B, T, dim)``.
        """
        T = x.shape[1]
        end = start + T
        mask = None
        if key_mask is not None or (caches is not None and T > 1):
            q_pos = torch.arange(start, end, device=x.device)
            keys = torch.arange(end, device=x.device)[None, :]
            mask = keys <= q_pos[:, None]                                             # (T, end) causal
            if key_mask is not None:
                # No token attends to padding, except a padded token to itself (no empty rows, no NaN).
                visible = key_mask[:, None, None, :end] | (keys == q_pos[:, None])[None, None]
                mask = mask[None, None] & visible                                     # (B, 1, T, end)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, None if caches is None else caches[i], start)
        return self.norm(x)

    def allocate_caches(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        """One static :class:`KVCache` of ``max_len`` positions per backbone block."""
        c = self.config
        return [KVCache(batch, c.num_heads, max_len, c.dim // c.num_heads, dtype, device) for _ in self.blocks]

    def hidden_states(self, seq: torch.Tensor, cond: Condition, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced backbone pass: states ``(B, T, dim)`` that predict codes ``0 .. T-1`` of the
        sequence ``seq (B, >= T-1, K)`` (no cache; what training and uncached sampling use)."""
        prefix, prefix_mask = self.condition_prefix(cond, drop)
        P, T = prefix.shape[1], seq.shape[1] + 1
        x = torch.cat([prefix, self.embed_codes(seq).to(prefix.dtype)], dim=1)     # (B, P + T - 1, dim)
        key_mask = None
        if prefix_mask is not None:
            key_mask = torch.cat([prefix_mask, prefix_mask.new_ones(seq.shape[0], seq.shape[1])], dim=1)
        h = self.backbone(self.token_drop(x), self.rope_tables(seq.shape[1]), key_mask)
        return h[:, P - 1:]                                                         # (B, T, dim)

    # ------------------------------------------------------------------ training
    def forward(self, codes: torch.Tensor, cond: Condition, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``(B, L, K, V)`` of codes ``(B, K, h, w)`` (raster order ``L = h*w``)."""
        seq = self.check_codes(codes)
        cond = self.check_condition(cond, seq.shape[0])
        return self._logits(seq, cond, drop)

    def _logits(self, seq: torch.Tensor, cond: Condition, drop: torch.Tensor | None) -> torch.Tensor:
        B, L, K = seq.shape
        h = self.hidden_states(seq[:, :-1], cond, drop)                              # (B, L, dim)
        return self.head(h.reshape(B * L, -1), seq.reshape(B * L, K)).view(B, L, K, -1)

    def loss(self, codes: torch.Tensor, cond: Condition) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training objective: mean cross-entropy over all ``B * L * K`` sub-codes.

        In training mode each condition is replaced by the null one with probability ``cond_dropout``.

        Returns:
            ``(loss, metrics)``; metrics (detached): ``loss``, ``nll_k`` for each sub-codebook k and
            ``accuracy`` (top-1 over all sub-codes).
        """
        seq = self.check_codes(codes)
        cond = self.check_condition(cond, seq.shape[0])
        drop = None
        if self.training and self.config.cond_dropout > 0:
            drop = torch.rand(seq.shape[0], device=seq.device) < self.config.cond_dropout
        logits = self._logits(seq, cond, drop).float()                              # (B, L, K, V)
        nll = F.cross_entropy(logits.flatten(0, 2), seq.flatten(), reduction='none').view_as(seq)  # (B, L, K)
        loss = nll.mean()
        with torch.no_grad():
            metrics = {'loss': loss.detach()}
            for k, value in enumerate(nll.detach().mean(dim=(0, 1))):
                metrics[f'nll_{k}'] = value
            metrics['accuracy'] = (logits.detach().argmax(-1) == seq).float().mean()
        return loss, metrics


@torch.no_grad()
def text_condition(tokenizer, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition of a text-conditional generator, from a UniTok tokenizer's own text tower.

    Args:
        tokenizer: a :class:`unitok.UniTok` (only its text tower runs).
        texts: a string, a list of strings, or BPE ids ``(N, text_context_length)``.
    Returns:
        ``(features (N, T, text_width) float32, mask (N, T) bool)``: the tower's per-token features
        (after its final LayerNorm, before pooling) and True from the start token to the end token.
    """
    ids = tokenizer._text_ids(texts)                                           # (N, T), validated
    tower = tokenizer.text_encoder
    previous = tower.output_tokens
    tower.output_tokens = True
    try:
        _, tokens = tower(ids)                                                 # (N, T, text_width)
    finally:
        tower.output_tokens = previous
    # The end-of-text token has the largest id of the vocabulary; padding (id 0) follows it.
    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= ids.argmax(dim=-1)[:, None]
    return tokens.float(), mask
