"""Quantizers behind one interface (:class:`Quantizer`), selected by name from a registry."""
from .base import Quantizer, QuantizerOutput
from .multi_codebook import MultiCodebookQuantizer, to_official_layout
from .registry import QUANTIZERS, create_quantizer, register_quantizer
from .vq import VectorQuantizer                      # noqa: E402  (each module registers its quantizer)
from .residual import ResidualQuantizer
from .fsq import FiniteScalarQuantizer
from .lfq import LookupFreeQuantizer
from .bsq import BinarySphericalQuantizer

__all__ = ['Quantizer', 'QuantizerOutput', 'MultiCodebookQuantizer', 'to_official_layout', 'QUANTIZERS',
           'create_quantizer', 'register_quantizer', 'VectorQuantizer', 'ResidualQuantizer',
           'FiniteScalarQuantizer', 'LookupFreeQuantizer', 'BinarySphericalQuantizer']
