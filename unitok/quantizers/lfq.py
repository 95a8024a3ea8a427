"""Lookup-free quantization (LFQ, MAGVIT-v2, arXiv 2310.05737): each dimension is quantized to its
sign, so a group of b dims is a b-bit code; an entropy term spreads the codes over the vocabulary.

The latent is mapped into K groups of b = log2(codebook_size) dims (:mod:`.implicit`); group k's
signs form sub-code k (8 groups of 9 bits = 8 x 512, 72 bits per token). Binary spherical
quantization (:mod:`.bsq`) is the same with each group l2-normalised first.

Written here rather than taken from vector-quantize-pytorch's ``LFQ``: it switches the straight-through
estimate and the entropy term on ``module.training`` instead of on autograd (so an evaluation-mode
forward with gradients is not straight-through, and a training-mode forward without gradients does
not return exactly the looked-up codes), and it all-reduces inside ``forward`` when a process group
exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.dataclass_io import ConfigError
from .base import Quantizer, QuantizerOutput, usage_stats
from .implicit import GroupProjection
from .registry import register_quantizer


class LookupFreeQuantizer(Quantizer):
    """K groups of b sign bits; sub-code k is the b-bit number of group k's positive dims (first dim = top bit).

    Args:
        groups: K.
        bits: b, so V = 2^b.
        dim: D, the latent width; a learned linear map pair when D != K * b.
        beta: weight of the commitment term ``||x - sg(q)||^2`` (x: the grouped latent).
        entropy_loss: compute the entropy term (mean per-token entropy minus ``diversity`` times the
            entropy of the batch's mean code distribution, soft assignments over the 2^b codes).
        entropy_temperature: temperature of those soft assignments.
        diversity: the weight of the batch entropy inside the term.
    """

    name = 'lfq'
    spherical = False

    def __init__(self, groups: int, bits: int, dim: int, beta: float = 0.25, entropy_loss: bool = False,
                 entropy_temperature: float = 0.01, diversity: float = 1.0):
        super().__init__()
        self.num_codebooks, self.bits, self.latent_dim = groups, bits, dim
        self.vocab_sizes = (1 << bits,) * groups
        self.beta, self.use_entropy_loss = beta, entropy_loss
        self.entropy_temperature, self.diversity = entropy_temperature, diversity
        self.projection = GroupProjection(dim, groups, bits)
        self.register_buffer('_shifts', torch.arange(bits - 1, -1, -1), persistent=False)

    def extra_repr(self) -> str:
        return f'groups={self.num_codebooks}, bits={self.bits}, dim={self.latent_dim}, beta={self.beta:g}'

    def _points(self, codes: torch.Tensor) -> torch.Tensor:
        """The quantized values of codes (...,) -> (..., b): +-1 per bit (BSQ: +-1/sqrt(b))."""
        signs = ((codes.long()[..., None] >> self._shifts) & 1).float() * 2 - 1
        return signs / self.bits ** 0.5 if self.spherical else signs

    def _grouped(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.projection.split(latents)                              # (B, T, K, b)
        return F.normalize(x, dim=-1) if self.spherical else x

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (B, T, K) of grouped latents: the bits of the positive dims."""
        return ((x.detach() > 0).long() << self._shifts).sum(-1)

    def code_vectors(self, k: int) -> torch.Tensor:
        every = torch.arange(self.vocab_sizes[k], device=self._shifts.device)
        return self.projection.code_vectors(self._points(every), k)

    @torch.no_grad()
    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.autocast(latents.device.type, enabled=False):
            return self._codes(self._grouped(latents)).permute(0, 2, 1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        with torch.autocast(codes.device.type, enabled=False):
            return self.projection.merge(self._points(codes.permute(0, 2, 1)))

    def forward(self, latents: torch.Tensor, update_usage: bool | None = None) -> QuantizerOutput:
        with torch.autocast(latents.device.type, enabled=False):
            x = self._grouped(latents)                                   # (B, T, K, b)
            codes = self._codes(x)                                       # (B, T, K)
            q = self._points(codes)
            commitment = self.beta * F.mse_loss(x, q)
            entropy = self._entropy(x) if self.use_entropy_loss else x.new_zeros(())
            codes = codes.permute(0, 2, 1)                               # (B, K, T)
            quantized = self.projection.merge(x + (q - x).detach()) if x.requires_grad else self.lookup(codes)
            stats = usage_stats(codes.transpose(0, 1).reshape(self.num_codebooks, -1), self.vocab_sizes[0])
        return QuantizerOutput(quantized=quantized, codes=codes, losses={'commitment': commitment, 'entropy': entropy},
                               stats=stats)

    def _entropy(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token entropy minus ``diversity`` x entropy of the mean assignment, over the 2^b codes of each group."""
        table = self._points(torch.arange(self.vocab_sizes[0], device=x.device))       # (V, b)
        logits = 2 * (x.reshape(-1, self.num_codebooks, self.bits) @ table.T) / self.entropy_temperature  # (N, K, V)
        prob, log_prob = logits.softmax(-1), logits.log_softmax(-1)
        per_token = -(prob * log_prob).sum(-1).mean()
        mean = prob.mean(0)                                                             # (K, V)
        batch = -(mean * torch.log(mean.clamp_min(1e-30))).sum(-1).mean()
        return per_token - self.diversity * batch

    def configure_training(self, config) -> None:
        self.use_entropy_loss = config.entropy_loss

    def materialize_non_persistent_buffers(self, device: torch.device) -> None:
        self._shifts = torch.arange(self.bits - 1, -1, -1, device=device)


def _bits(config) -> int:
    bits = config.codebook_size.bit_length() - 1
    if config.codebook_size != 1 << bits or bits < 1:
        raise ConfigError(f"quantizer={config.quantizer!r} needs a power-of-two codebook_size (2^bits per group), "
                          f'got {config.codebook_size}')
    return bits


def build_binary(cls, config):
    """A :class:`LookupFreeQuantizer` (or subclass) of K = num_codebooks groups of log2(codebook_size) bits."""
    return cls(config.num_codebooks, _bits(config), config.latent_dim, beta=config.commitment_beta,
               entropy_loss=config.entropy_loss, entropy_temperature=config.entropy_temperature)


@register_quantizer('lfq')
def _lfq(config) -> LookupFreeQuantizer:
    return build_binary(LookupFreeQuantizer, config)
