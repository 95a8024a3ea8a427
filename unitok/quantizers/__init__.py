"""Quantizers behind one interface (:class:`Quantizer`), selected by name from a registry."""
from .base import Quantizer, QuantizerOutput
from .multi_codebook import MultiCodebookQuantizer, to_official_layout
from .registry import QUANTIZERS, create_quantizer, register_quantizer

__all__ = ['Quantizer', 'QuantizerOutput', 'MultiCodebookQuantizer', 'to_official_layout', 'QUANTIZERS',
           'create_quantizer', 'register_quantizer']
