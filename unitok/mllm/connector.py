"""The image side of the multimodal LLM: UniTok codes -> LLM input embeddings.

:class:`CodeInput` turns the K sub-codes of a grid position into the tokenizer's code vectors (its
quantizer's :meth:`~unitok.quantizers.Quantizer.code_table`, what ``lookup`` returns) and, when
given, its post-quantization projection applied to each position alone; both frozen copies taken from the
tokenizer. The
:class:`Projector` is a per-token MLP to the LLM width: each position is mapped on its own, so the
embedding of an image position is the same whether a whole image is read in one pass (training,
understanding) or one generated position at a time (sampling with a KV cache).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class CodeInput(nn.Module):
    """Sub-codes ``(N, K)`` -> code vectors ``(N, K*d)`` -> (optionally) the post-quant projection.

    Args:
        codebooks: ``(K, V, d)`` code vectors, the tokenizer quantizer's ``code_table()``.
        post_quant: the tokenizer's ``post_quant_proj`` (copied and frozen) or None.
        post_quant_dim: its output width (required with ``post_quant``).
    """

    def __init__(self, codebooks: torch.Tensor, post_quant: nn.Module | None = None, post_quant_dim: int = 0):
        super().__init__()
        K, V, d = codebooks.shape
        self.num_codebooks, self.codebook_size, self.code_dim = K, V, d
        self.register_buffer('table', codebooks.detach().float().reshape(K * V, d).clone())
        self.register_buffer('offsets', torch.arange(K) * V, persistent=False)
        self.post_quant = copy.deepcopy(post_quant).requires_grad_(False) if post_quant is not None else None
        self.out_dim = post_quant_dim if post_quant is not None else K * d

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``(N, K)`` int64 -> ``(N, out_dim)`` float32."""
        if codes.dim() != 2 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f'codes must be (N, {self.num_codebooks}), got {tuple(codes.shape)}')
        vectors = F.embedding(codes.long() + self.offsets, self.table).flatten(1)     # (N, K*d)
        if self.post_quant is None:
            return vectors
        # Each position alone (a sequence of one): UniTok's attention projection would otherwise mix the
        # positions of an image, which a generated position cannot see yet. Float32, autocast off, as UniTok.
        with torch.autocast(vectors.device.type, enabled=False):
            return self.post_quant(vectors[:, None].float())[:, 0]


class Projector(nn.Module):
    """Per-token MLP ``in_dim -> hidden -> out_dim`` (LayerNorm, Linear, GELU, Linear)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class CausalCodeEmbedder(nn.Module):
    """The released MLLM's image input (``multi_embedder``): sub-codes ``(B, L, K)`` -> unit code vectors
    ``(B, L, K*d)`` -> a causal :class:`~unitok.modules.projection.AttnProjection` (K*d -> ``proj_dim``; position
    t sees positions 0..t of the same call) -> :class:`Projector` (LayerNorm eps 1e-6) -> ``(B, L, llm_dim)``.

    ``usage`` keeps the checkpoint's per-code usage statistic (a training record, unused here) for saving.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, code_dim: int, llm_dim: int, proj_dim: int = 1024,
                 proj_heads: int = 16):
        super().__init__()
        from ..modules.projection import AttnProjection
        K, V, d = num_codebooks, codebook_size, code_dim
        self.num_codebooks, self.codebook_size, self.code_dim = K, V, d
        self.codebooks = nn.Parameter(torch.zeros(K, V, d))
        self.register_buffer('usage', torch.zeros(K, V))
        self.projection = AttnProjection(K * d, proj_dim, proj_heads, causal=True)
        self.projector = Projector(proj_dim, llm_dim, llm_dim, norm_eps=1e-6)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, L, K)`` -> ``(B, L, K*d)``: each sub-code's l2-normalised vector, sub-codebooks side by side."""
        # Gather first, then normalise the gathered rows: the same values as normalising the whole (K, V, d)
        # table and gathering (row-wise), without re-normalising all K*V rows at every generated position.
        vectors = torch.stack([F.embedding(codes[..., k], self.codebooks[k]) for k in range(self.num_codebooks)], -2)
        return F.normalize(vectors, dim=-1).flatten(-2)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 3 or codes.shape[-1] != self.num_codebooks:
            raise ValueError(f'codes must be (B, L, {self.num_codebooks}), got {tuple(codes.shape)}')
        return self.projector(self.projection(self.code_vectors(codes.long())))
