"""Building blocks of UniTok: encoder (timm ViTamin), projections, decoder, text tower."""
from .decoder import ViTaminDecoder
from .encoder import VITAMIN_VARIANTS, ViTaminSpec, build_encoder
from .projection import AttnProjection, build_projection
from .text import build_text_tower, tokenize

__all__ = ['VITAMIN_VARIANTS', 'ViTaminSpec', 'build_encoder', 'ViTaminDecoder', 'AttnProjection',
           'build_projection', 'build_text_tower', 'tokenize']
