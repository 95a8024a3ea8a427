"""unitok: the UniTok unified image tokenizer (arXiv 2502.20321) as a library.

    >>> import unitok
    >>> model = unitok.UniTok.from_pretrained('path/to/model')      # or an official .pth release
    >>> codes = model.encode(unitok.images.to_tensor('cat.jpg'))     # (1, 8, 16, 16) int64
    >>> images = model.decode(codes)                                  # (1, 3, 256, 256) in [-1, 1]
"""
from . import images
from .checkpoint import CheckpointError, load_official_checkpoint, official_state_dict, save_official_checkpoint
from .config import PRESETS, ConfigError, UniTokConfig
from .model import UniTok, UniTokOutput
from .quantizer import MultiCodebookQuantizer, QuantizerOutput
from .sequence import codes_to_sequence, sequence_to_codes
from .generation import GeneratorConfig, GeneratorModel

__version__ = '0.1.0'


def create_model(preset: str = 'unitok-large', **overrides) -> UniTok:
    """A randomly initialised :class:`UniTok` from a preset name plus config overrides."""
    return UniTok(UniTokConfig.from_preset(preset, **overrides))


__all__ = [
    'UniTok', 'UniTokConfig', 'UniTokOutput', 'PRESETS', 'create_model', 'MultiCodebookQuantizer',
    'QuantizerOutput', 'load_official_checkpoint', 'official_state_dict', 'save_official_checkpoint',
    'codes_to_sequence', 'sequence_to_codes', 'images', 'CheckpointError', 'ConfigError',
    'GeneratorModel', 'GeneratorConfig',
]
