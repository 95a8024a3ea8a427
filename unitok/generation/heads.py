"""Output heads of the generator: from the backbone's hidden state of a grid position to the logits
of its K sub-codes.

* :class:`DepthHead` -- a small causal transformer over the K sub-codes of one position (as in
  UniTok's LlamaGen experiments, there called the autoregressive head): step 0 reads the backbone
  state, step k > 0 the embedding of sub-code k-1; step k predicts sub-code k with its own output
  matrix. Trained teacher-forced in one batched pass; sampled step by step with a KV cache.
* :class:`ParallelHead` -- K independent linear heads (the sub-codes of a position do not see each
  other), for the ablation.
* :class:`LlamaCodeHead` -- the head of the released UniTok MLLM (``ar_head``): ``transformers`` Llama
  decoder layers at the LLM's width over ``[h, code embeddings of sub-codes 0..K-2]`` with rotary
  positions 0..K-1, and one linear head shared by all K steps.

Both map ``h (N, C)`` and the target codes ``(N, K)`` to logits ``(N, K, V)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Block, KVCache, RMSNorm


class ParallelHead(nn.Module):
    """K linear heads ``C -> V``, one per sub-codebook, applied to the same hidden state."""

    sequential = False

    def __init__(self, dim: int, num_codebooks: int, codebook_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_codebooks, codebook_size, dim))   # (K, V, C)
        self.bias = nn.Parameter(torch.zeros(num_codebooks, codebook_size))           # (K, V)

    def forward(self, h: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """h: ``(N, C)`` -> logits ``(N, K, V)`` (``codes`` is ignored: no sub-code sees another)."""
        K, V, C = self.weight.shape
        return (h @ self.weight.view(K * V, C).t()).view(-1, K, V) + self.bias


class DepthHead(nn.Module):
    """Causal transformer over the K sub-code steps of one position.

    Args:
        in_dim: width of the backbone hidden state.
        width, depth, num_heads, ffn_dim: size of the head's transformer.
        num_codebooks, codebook_size: K and V.
        norm_eps, drop, attn_drop: as in :class:`~unitok.generation.layers.Block`.
    """

    sequential = True

    def __init__(self, in_dim: int, width: int, depth: int, num_heads: int, ffn_dim: int, num_codebooks: int,
                 codebook_size: int, norm_eps: float = 1e-5, drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        K, V = num_codebooks, codebook_size
        self.num_codebooks, self.codebook_size, self.num_heads = K, V, num_heads
        self.in_proj = nn.Identity() if in_dim == width else nn.Linear(in_dim, width, bias=False)
        self.code_embed = nn.Embedding((K - 1) * V, width)     # inputs: sub-codes 0 .. K-2, stacked tables
        self.pos_embed = nn.Parameter(torch.zeros(K, width))    # one position embedding per step
        self.blocks = nn.ModuleList(Block(width, num_heads, ffn_dim, norm_eps, drop, attn_drop)
                                    for _ in range(depth))
        self.norm = RMSNorm(width, norm_eps)
        self.weight = nn.Parameter(torch.zeros(K, V, width))    # one output matrix per sub-codebook (K, V, W)
        self.bias = nn.Parameter(torch.zeros(K, V))
        self.register_buffer('offsets', torch.arange(max(K - 1, 0)) * V, persistent=False)

    @property
    def width(self) -> int:
        return self.pos_embed.shape[1]

    def step_inputs(self, h: torch.Tensor, prev_codes: torch.Tensor) -> torch.Tensor:
        """Inputs of steps ``0 .. j``: ``h (N, C)`` and the first ``j`` sub-codes ``(N, j)`` -> ``(N, j+1, W)``."""
        j = prev_codes.shape[1]
        first = self.in_proj(h)[:, None]                                             # (N, 1, W)
        rest = self.code_embed(prev_codes + self.offsets[:j])                         # (N, j, W)
        return torch.cat([first, rest.to(first.dtype)], dim=1) + self.pos_embed[:j + 1]

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of all K steps in one causal pass.

        Args:
            h: ``(N, C)`` backbone hidden states.
            codes: ``(N, K)`` target sub-codes (step k reads sub-code k-1; the last one is not read).
        Returns:
            ``(N, K, V)`` logits.
        """
        return self.logits_upto(h, codes[:, :self.num_codebooks - 1])

    def logits_upto(self, h: torch.Tensor, prev_codes: torch.Tensor) -> torch.Tensor:
        """Logits of steps ``0 .. j`` ``(N, j+1, V)`` given the first ``j`` sub-codes ``(N, j)``, no cache."""
        x = self.step_inputs(h, prev_codes)                                          # (N, j+1, W)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        j1 = x.shape[1]
        return torch.einsum('nkw,kvw->nkv', x, self.weight[:j1].to(x.dtype)) + self.bias[:j1]

    # ------------------------------------------------------------------ cached step-by-step decoding
    def allocate_cache(self, batch: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        """One K-position cache per block (reused for every grid position: step k overwrites slot k)."""
        hd = self.width // self.num_heads
        return [KVCache(batch, self.num_heads, self.num_codebooks, hd, dtype, device) for _ in self.blocks]

    def first_input(self, h: torch.Tensor) -> torch.Tensor:
        """Input of step 0, ``h (N, C) -> (N, 1, W)``."""
        return (self.in_proj(h) + self.pos_embed[0])[:, None]

    def code_input(self, code: torch.Tensor, k: int) -> torch.Tensor:
        """Input of step ``k >= 1``: sub-code ``k-1`` ``(N,)`` -> ``(N, 1, W)``."""
        return (self.code_embed(code + self.offsets[k - 1]) + self.pos_embed[k])[:, None]

    def step(self, x: torch.Tensor, k: int, cache: list[KVCache]) -> torch.Tensor:
        """Run step ``k`` on its input ``(N, 1, W)`` with the cache; return the logits ``(N, V)`` of sub-code k."""
        for block, c in zip(self.blocks, cache):
            x = block(x, cache=c, start=k)
        x = self.norm(x[:, 0])                                                       # (N, W)
        return F.linear(x, self.weight[k].to(x.dtype), self.bias[k].to(x.dtype))


class LlamaCodeHead(nn.Module):
    """The released MLLM's sub-code head, built from ``transformers``' own Llama layers (parameter names as
    the official ``ar_head``: ``layers``, ``norm``, ``linear_head``, ``codebooks``).

    Same interface as :class:`DepthHead` (teacher-forced ``forward``, ``logits_upto``, and cached
    ``first_input`` / ``code_input`` / ``step``); the cache is a ``transformers`` ``DynamicCache``, new for
    every grid position.

    Args:
        config: the LLM's ``LlamaConfig`` (the layers take its width, heads, MLP size, norm eps, rope).
        num_codebooks, codebook_size: K and V.
        depth: number of decoder layers (3 in the release).
    """

    sequential = True

    def __init__(self, config, num_codebooks: int, codebook_size: int, depth: int = 3):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
        C = config.hidden_size
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        self.linear_head = nn.Linear(C, codebook_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(depth))
        self.norm = LlamaRMSNorm(C, eps=config.rms_norm_eps)
        self.codebooks = nn.ModuleList(nn.Embedding(codebook_size, C) for _ in range(num_codebooks - 1))
        self.rotary = LlamaRotaryEmbedding(config)
        self.cache_name = self._cache_name(self.layers[0])

    @property
    def pos_embed(self) -> torch.Tensor:
        """The head's first weight (callers read its dtype and device, as of :class:`DepthHead`)."""
        return self.linear_head.weight

    def step_inputs(self, h: torch.Tensor, prev_codes: torch.Tensor) -> torch.Tensor:
        """``h (N, C)`` and the first ``j`` sub-codes ``(N, j)`` -> the inputs of steps ``0..j`` ``(N, j+1, C)``."""
        rest = [self.codebooks[k](prev_codes[:, k]).to(h.dtype) for k in range(prev_codes.shape[1])]
        return torch.stack([h] + rest, dim=1)

    def _run(self, x: torch.Tensor, start: int, cache=None) -> torch.Tensor:
        T = x.shape[1]
        pos = torch.arange(start, start + T, device=x.device)[None].expand(x.shape[0], -1)
        rope = self.rotary(x, pos)
        mask = None
        if T > 1:            # an explicit causal mask: eager attention adds it, SDPA reads it
            mask = torch.full((T, T), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)[None, None]
        kw = {self.cache_name: cache} if cache is not None else {}
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=pos, use_cache=cache is not None, position_embeddings=rope,
                      **kw)
        return self.linear_head(self.norm(x))

    @staticmethod
    def _cache_name(layer) -> str:
        """The layers' name of the cache argument: ``cache`` (transformers 5), else ``past_key_values`` /
        ``past_key_value`` (older)."""
        import inspect
        params = inspect.signature(layer.forward).parameters
        return next((n for n in ('cache', 'past_key_values', 'past_key_value') if n in params), 'cache')

    def forward(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(N, K, V)`` of ``h (N, C)`` and the target sub-codes ``(N, K)``."""
        return self.logits_upto(h, codes[:, :self.num_codebooks - 1])

    def logits_upto(self, h: torch.Tensor, prev_codes: torch.Tensor) -> torch.Tensor:
        """Logits of steps ``0..j`` ``(N, j+1, V)`` given the first ``j`` sub-codes, no cache (as the official loop)."""
        return self._run(self.step_inputs(h, prev_codes), 0)

    def allocate_cache(self, batch: int, dtype: torch.dtype, device: torch.device) -> list:
        """A holder for the ``DynamicCache`` of the current grid position (made anew at step 0)."""
        return [None]

    def first_input(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, None]

    def code_input(self, code: torch.Tensor, k: int) -> torch.Tensor:
        """Input of step ``k >= 1``: sub-code ``k-1`` ``(N,)`` -> ``(N, 1, C)``."""
        return self.codebooks[k - 1](code)[:, None]

    def step(self, x: torch.Tensor, k: int, cache: list) -> torch.Tensor:
        """Step ``k`` on its input ``(N, 1, C)``; the logits ``(N, V)`` of sub-code k."""
        if k == 0:
            from transformers import DynamicCache
            cache[0] = DynamicCache()
        return self._run(x.to(self.pos_embed.dtype), k, cache[0])[:, 0]
