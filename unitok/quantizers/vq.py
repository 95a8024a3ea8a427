"""Single-codebook vector quantization: one codebook of l2-normalised codes for the whole latent.

The low anchor of the quantizer family: multi-codebook quantization with K = 1 (the same cosine
nearest-code search, losses and usage statistics), registered as ``'vq'`` so a config says which
rule it means. A token carries log2(codebook_size) bits.
"""
from __future__ import annotations

from ..utils.dataclass_io import ConfigError
from .multi_codebook import MultiCodebookQuantizer
from .registry import register_quantizer


class VectorQuantizer(MultiCodebookQuantizer):
    """One codebook of ``codebook_size`` unit codes of width ``code_dim`` (codes (B, 1, L)).

    Args:
        codebook_size: n codes.
        code_dim: d, the latent width.
        beta, entropy_loss, entropy_temperature: as :class:`MultiCodebookQuantizer`.
    """

    name = 'vq'

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, entropy_loss: bool = False,
                 entropy_temperature: float = 0.01):
        super().__init__(1, codebook_size, code_dim, beta=beta, entropy_loss=entropy_loss,
                         entropy_temperature=entropy_temperature)


@register_quantizer('vq')
def _vq(config) -> VectorQuantizer:
    if config.num_codebooks != 1:
        raise ConfigError(f"quantizer='vq' is one codebook: set num_codebooks=1 (and code_dim to the latent "
                          f'width), got num_codebooks={config.num_codebooks}')
    return VectorQuantizer(config.codebook_size, config.code_dim, beta=config.commitment_beta,
                           entropy_loss=config.entropy_loss, entropy_temperature=config.entropy_temperature)
