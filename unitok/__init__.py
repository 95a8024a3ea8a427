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
from .quantizers import MultiCodebookQuantizer, QuantizerOutput
from .sequence import codes_to_sequence, sequence_to_codes
from .generation import GeneratorConfig, GeneratorModel

__version__ = '0.1.0'


def create_model(preset: str = 'unitok-large', **overrides) -> UniTok:
    """A randomly initialised :class:`UniTok` from a preset name plus config overrides."""
    return UniTok(UniTokConfig.from_preset(preset, **overrides))


def _warn_if_the_other_unitok_is_installed() -> None:
    """PyPI's ``unitok`` is an unrelated project that installs the same top-level ``unitok`` package and
    ``unitok`` command as this one (distribution ``unitok-vision``); say so at import (one lookup, ~ms)."""
    import warnings
    from importlib import metadata
    try:
        other = metadata.distribution('unitok')
    except metadata.PackageNotFoundError:
        return
    if (other.metadata.get('Summary') or '').startswith('UniTok:'):   # this project under its former name
        return
    warnings.warn(f"the unrelated PyPI package 'unitok' {other.version} is installed in this environment too: "
                  'it writes the same top-level `unitok` package and `unitok` command as unitok-vision, so one '
                  'overwrites the files of the other. Run `pip uninstall unitok unitok-vision` and reinstall '
                  'unitok-vision, or keep the two in separate virtual environments.', RuntimeWarning, stacklevel=2)


_warn_if_the_other_unitok_is_installed()


def __getattr__(name):
    # The multimodal LLM needs transformers: imported on first use, never by `import unitok`.
    if name == 'UniTokMLLM':
        from .mllm import UniTokMLLM
        return UniTokMLLM
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'UniTok', 'UniTokConfig', 'UniTokOutput', 'PRESETS', 'create_model', 'MultiCodebookQuantizer',
    'QuantizerOutput', 'load_official_checkpoint', 'official_state_dict', 'save_official_checkpoint',
    'codes_to_sequence', 'sequence_to_codes', 'images', 'CheckpointError', 'ConfigError',
    'GeneratorModel', 'GeneratorConfig', 'UniTokMLLM',
]
