"""Residual vector quantization (RQ-VAE, arXiv 2203.01822): L levels, each quantizing what the
levels before it left over.

The latent (B, T, D) is l2-normalised (the same input scale as the multi-codebook quantizer), then
level k picks the code of its codebook (n codes of width D) nearest in Euclidean distance to the
residual r_k and passes on r_{k+1} = r_k - c_k. The quantized latent is the sum of the L chosen codes;
the codes (B, L, T) are read as K = L sub-codes of vocabulary n, so export, generators and evaluation
treat them like multi-codebook codes.

Written here rather than taken from vector-quantize-pytorch: its ``ResidualVQ`` learns codebooks by
EMA updates inside ``forward`` (and quantize-dropout), while this comparison keeps the codebook and
commitment losses of the multi-codebook quantizer, so only the quantization rule changes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Quantizer, QuantizerOutput, usage_stats
from .registry import register_quantizer


class ResidualQuantizer(Quantizer):
    """``levels`` codebooks of ``codebook_size`` codes of width ``dim``, applied one after another.

    Args:
        levels: L, codes per token (the K of the interface).
        codebook_size: n, codes per level.
        dim: D, the latent width (each code is D wide).
        beta: weight of the commitment term ``||z - sg(q)||^2``.

    State dict: ``codebooks`` (L, n, D).
    """

    name = 'residual'

    def __init__(self, levels: int, codebook_size: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.num_codebooks, self.codebook_size, self.latent_dim = levels, codebook_size, dim
        self.vocab_sizes = (codebook_size,) * levels
        self.beta = beta
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, dim))
        self.init_weights()

    def extra_repr(self) -> str:
        return f'levels={self.num_codebooks}, codebook_size={self.codebook_size}, dim={self.latent_dim}'

    @torch.no_grad()
    def init_weights(self) -> None:
        """Level k starts with codes of norm about 2^-k: residuals shrink level by level."""
        self.codebooks.normal_()
        scale = 2.0 ** -torch.arange(self.num_codebooks, dtype=torch.float32) / self.latent_dim ** 0.5
        self.codebooks.mul_(scale[:, None, None].to(self.codebooks.device))

    def code_vectors(self, k: int) -> torch.Tensor:
        """The codes of level k, (n, D) float32: what sub-code k adds to the latent."""
        return self.codebooks[k].float()

    def _normalize(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 3 or latents.shape[-1] != self.latent_dim:
            raise ValueError(f'quantizer expects latents (B, T, {self.latent_dim}), got {tuple(latents.shape)}')
        return F.normalize(latents.float(), dim=-1)

    @torch.no_grad()
    def _search(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (L, N) of the unit latents z (N, D), level by level."""
        table = self.codebooks.detach().float()                          # (L, n, D)
        norms = table.square().sum(-1)                                   # (L, n)
        residual, codes = z.detach().clone(), []
        for k in range(self.num_codebooks):
            idx = (norms[k] - 2 * residual @ table[k].T).argmin(-1)      # ||r||^2 is the same for every code
            residual -= table[k][idx]
            codes.append(idx)
        return torch.stack(codes)

    def _levels(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """The chosen code vectors of each level, L tensors (N, D), from codes (L, N)."""
        table = self.codebooks.float()
        return [F.embedding(codes[k], table[k]) for k in range(self.num_codebooks)]

    @torch.no_grad()
    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, T, D) -> codes (B, L, T) int64."""
        with torch.autocast(latents.device.type, enabled=False):
            z = self._normalize(latents)
            B, T, D = z.shape
            return self._search(z.view(B * T, D)).view(self.num_codebooks, B, T).transpose(0, 1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, L, T) -> the sum of the chosen codes (B, T, D) float32."""
        self.check_codes(codes)
        B, L, T = codes.shape
        return sum(self._levels(codes.long().transpose(0, 1).reshape(L, B * T))).view(B, T, self.latent_dim)

    def forward(self, latents: torch.Tensor, update_usage: bool | None = None) -> QuantizerOutput:
        """Quantize latents (B, T, D); the codebook loss of each level pulls its code to its residual."""
        with torch.autocast(latents.device.type, enabled=False):
            z = self._normalize(latents)
            B, T, D = z.shape
            flat = z.view(B * T, D)
            codes = self._search(flat)                                   # (L, N)
            chosen = self._levels(codes)
            q = sum(chosen)                                              # (N, D), summed in lookup's order
            residual, codebook_loss = flat.detach(), flat.new_zeros(())
            for c in chosen:                                             # each level towards its own residual
                codebook_loss = codebook_loss + F.mse_loss(c, residual)
                residual = residual - c.detach()
            commitment = self.beta * F.mse_loss(flat, q.detach()) + codebook_loss
            quantized = flat + (q - flat).detach() if flat.requires_grad else q.detach()
            stats = usage_stats(codes, self.codebook_size)
        return QuantizerOutput(quantized=quantized.view(B, T, D), codes=codes.view(self.num_codebooks, B, T).transpose(0, 1),
                               losses={'commitment': commitment}, stats=stats)


@register_quantizer('residual')
def _residual(config) -> ResidualQuantizer:
    return ResidualQuantizer(config.num_codebooks, config.codebook_size, config.latent_dim, beta=config.commitment_beta)
