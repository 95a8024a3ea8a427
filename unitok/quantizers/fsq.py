"""Finite scalar quantization (FSQ, arXiv 2309.15505): every dimension is bounded and rounded to one
of a few levels; no codebook is learned.

The latent is mapped into K groups of ``len(levels)`` dims (:mod:`.implicit`); group k's rounded
dims form one sub-code, the mixed-radix number of its levels, of vocabulary ``prod(levels)``
(8 groups of levels [8, 8, 8] = 8 x 512, 72 bits per token). The bounding, rounding and index
arithmetic are vector-quantize-pytorch's ``FSQ`` (the optional extra ``unitok-vision[quantizers]``).
"""
from __future__ import annotations

import math

import torch

from ..utils.dataclass_io import ConfigError
from .base import Quantizer, QuantizerOutput, usage_stats
from .implicit import GroupProjection
from .registry import register_quantizer


def _fsq_class():
    try:
        from vector_quantize_pytorch import FSQ
    except ImportError:
        raise ImportError("quantizer='fsq' needs vector-quantize-pytorch: pip install 'unitok-vision[quantizers]'") from None
    return FSQ


class FiniteScalarQuantizer(Quantizer):
    """K groups of ``len(levels)`` dims, dim i rounded to ``levels[i]`` values; V = prod(levels).

    Args:
        groups: K, sub-codes per token.
        levels: levels of each dim of a group (each >= 3: the library's bounding needs it).
        dim: D, the latent width; a learned linear map pair when D != K * len(levels).
    """

    name = 'fsq'

    def __init__(self, groups: int, levels: tuple[int, ...], dim: int):
        super().__init__()
        self.levels = tuple(int(v) for v in levels)
        self.num_codebooks, self.latent_dim = groups, dim
        self.vocab_sizes = (math.prod(self.levels),) * groups
        self.projection = GroupProjection(dim, groups, len(self.levels))
        self.fsq = self._library_fsq()

    def _library_fsq(self):
        # its own projections are off (dim = K * g): GroupProjection does that part; no parameters
        return _fsq_class()(list(self.levels), dim=self.num_codebooks * len(self.levels), num_codebooks=self.num_codebooks)

    def materialize_non_persistent_buffers(self, device: torch.device) -> None:
        self.fsq = self._library_fsq().to(device)      # its level tables are non-persistent buffers

    def extra_repr(self) -> str:
        return f'groups={self.num_codebooks}, levels={list(self.levels)}, dim={self.latent_dim}'

    def _points(self, codes: torch.Tensor) -> torch.Tensor:
        """Level values in [-1, 1] of codes (...,) -> (..., g)."""
        return self.fsq._indices_to_codes(codes).float()

    def code_vectors(self, k: int) -> torch.Tensor:
        every = torch.arange(self.vocab_sizes[k], device=self.fsq._levels.device)
        return self.projection.code_vectors(self._points(every), k)

    def _quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (B, T, D) -> straight-through rounded groups (B, T, K, g) and codes (B, T, K)."""
        z = self.projection.split(latents)
        rounded = self.fsq.quantize(z)                               # round_ste: gradients pass through
        return rounded, self.fsq.codes_to_indices(rounded).long()

    @torch.no_grad()
    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.autocast(latents.device.type, enabled=False):
            return self._quantize(latents)[1].permute(0, 2, 1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        with torch.autocast(codes.device.type, enabled=False):
            return self.projection.merge(self._points(codes.long().permute(0, 2, 1)))

    def forward(self, latents: torch.Tensor, update_usage: bool | None = None) -> QuantizerOutput:
        """No codebook to learn and no commitment term (zero): the bounding keeps the latent in range."""
        with torch.autocast(latents.device.type, enabled=False):
            rounded, codes = self._quantize(latents)
            codes = codes.permute(0, 2, 1)                            # (B, K, T)
            quantized = self.projection.merge(rounded) if rounded.requires_grad else self.lookup(codes)
            stats = usage_stats(codes.transpose(0, 1).reshape(self.num_codebooks, -1), self.vocab_sizes[0])
        return QuantizerOutput(quantized=quantized, codes=codes, losses={'commitment': quantized.new_zeros(())},
                               stats=stats)


def default_levels(codebook_size: int) -> tuple[int, ...]:
    """Levels of 8 (one 4 or 16 for the rest) whose product is a power-of-two ``codebook_size``."""
    bits = codebook_size.bit_length() - 1
    if codebook_size != 1 << bits or bits < 2:
        raise ConfigError(f"quantizer='fsq' without quantizer_levels needs a power-of-two codebook_size >= 4, "
                          f'got {codebook_size}; set quantizer_levels')
    levels = [8] * (bits // 3)
    if bits % 3 == 2:
        levels.append(4)
    elif bits % 3 == 1:
        levels = levels[:-1] + [16]
    return tuple(levels)


@register_quantizer('fsq')
def _fsq(config) -> FiniteScalarQuantizer:
    levels = tuple(config.quantizer_levels) or default_levels(config.codebook_size)
    if math.prod(levels) != config.codebook_size or min(levels) < 3:
        raise ConfigError(f'quantizer_levels {list(levels)}: each must be >= 3 and their product must equal '
                          f'codebook_size ({config.codebook_size}), got product {math.prod(levels)}')
    return FiniteScalarQuantizer(config.num_codebooks, levels, config.latent_dim)
