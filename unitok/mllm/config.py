"""The configuration of a :class:`~unitok.mllm.UniTokMLLM`, saved as ``mllm.json``."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..utils import dataclass_io


@dataclass
class MLLMConfig:
    """Architecture of a :class:`UniTokMLLM` (the LLM itself is referenced, not described).

    ``num_codebooks``, ``codebook_size``, ``code_dim``, ``grid`` and ``post_quant_dim`` come from the
    UniTok tokenizer; ``image_token_ids``, ``base_vocab`` and ``llm_ref`` from the LLM at build time.
    """
    llm: str = 'smollm2'                  # LLM spec (see unitok.mllm.llm)
    num_codebooks: int = 8
    codebook_size: int = 4096
    code_dim: int = 8
    grid: tuple[int, int] = (16, 16)
    post_quant: bool = True               # read code vectors through the tokenizer's post-quant projection
    post_quant_dim: int = 0
    projector_hidden: int = 0             # 0: the LLM width
    head_width: int = 256
    head_depth: int = 2
    head_heads: int = 4
    head_ffn: int = 0                     # 0: 8/3 of the head width, rounded up to a multiple of 32
    lora_rank: int = 0                    # > 0: LoRA adapters (peft) in the LLM
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
    llm_dim: int = 0
    base_vocab: int = 0                   # the LLM's vocabulary before the image tokens were added
    image_token_ids: dict = field(default_factory=dict)
    llm_ref: dict = field(default_factory=dict)         # spec, gguf file, config / vocab sha256
    tokenizer_ref: dict = field(default_factory=dict)   # UniTok path and its codes identity (unitok.codes.format.tokenizer_identity)

    def __post_init__(self):
        dataclass_io.coerce_fields(self)

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        return dataclass_io.to_dict(self)

    @classmethod
    def from_dict(cls, d) -> 'MLLMConfig':
        return dataclass_io.from_dict(cls, d)
