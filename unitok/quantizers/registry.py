"""The quantizer registry: ``UniTokConfig.quantizer`` names a builder ``config -> Quantizer``.

A new quantizer registers itself with ``@register_quantizer('name')`` on a function that builds it
from a :class:`~unitok.UniTokConfig`; ``UniTokConfig(quantizer='name')`` then selects it.
"""
from __future__ import annotations

from typing import Callable

from ..utils.dataclass_io import ConfigError
from .base import Quantizer
from .multi_codebook import MultiCodebookQuantizer

QUANTIZERS: dict[str, Callable[..., Quantizer]] = {}


def register_quantizer(name: str) -> Callable:
    """Decorator: register ``builder(config) -> Quantizer`` under ``name`` (a name is taken once)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f'a quantizer name must be a non-empty string, got {name!r}')

    def register(builder: Callable[..., Quantizer]) -> Callable[..., Quantizer]:
        if name in QUANTIZERS and QUANTIZERS[name] is not builder:
            raise ValueError(f'quantizer {name!r} is registered already ({QUANTIZERS[name]!r})')
        QUANTIZERS[name] = builder
        return builder
    return register


def create_quantizer(config) -> Quantizer:
    """The quantizer ``config.quantizer`` names, built from ``config`` (a :class:`~unitok.UniTokConfig`)."""
    builder = QUANTIZERS.get(config.quantizer)
    if builder is None:
        raise ConfigError(f'unknown quantizer {config.quantizer!r}; registered: {sorted(QUANTIZERS)} '
                          '(register one with unitok.quantizers.register_quantizer)')
    quantizer = builder(config)
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f'the builder of quantizer {config.quantizer!r} returned {type(quantizer).__name__}, '
                        'not a unitok.quantizers.Quantizer')
    quantizer.name = config.quantizer
    return quantizer


@register_quantizer('multi_codebook')
def _multi_codebook(config) -> MultiCodebookQuantizer:
    return MultiCodebookQuantizer(config.num_codebooks, config.codebook_size, config.code_dim,
                                  beta=config.commitment_beta, entropy_loss=config.entropy_loss,
                                  entropy_temperature=config.entropy_temperature)
