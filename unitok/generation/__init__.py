"""Autoregressive generation over UniTok codes: a LlamaGen-style generator and its sampler.

    >>> from unitok.generation import GeneratorModel, generate
    >>> gen = GeneratorModel.from_preset('gen-B')                  # class-conditional, 8 x 4096 codes, 16x16 grid
    >>> codes = generate(gen, torch.tensor([207, 360]), cfg_scale=4.0, top_k=1000, generator=0)
    >>> images = tokenizer.decode(codes)                           # codes (2, 8, 16, 16) int64
"""
from .config import GENERATOR_PRESETS, GeneratorConfig, GeneratorConfigError
from .gpt import GeneratorModel, text_condition
from .heads import DepthHead, ParallelHead
from .sampling import filter_logits, generate, guidance_scales, sample_logits

__all__ = [
    'GeneratorConfig', 'GeneratorConfigError', 'GENERATOR_PRESETS', 'GeneratorModel', 'DepthHead', 'ParallelHead',
    'generate', 'guidance_scales', 'filter_logits', 'sample_logits', 'text_condition',
]

from ..codes import CodeDataset, CodeFormatError, ExportConfig, export_codes  # noqa: E402  (exported codes)
__all__ += ['CodeDataset', 'CodeFormatError', 'ExportConfig', 'export_codes']
