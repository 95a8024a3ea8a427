"""Architecture of the autoregressive generator over UniTok codes: one typed dataclass and presets.

The generator is a LlamaGen-style decoder-only transformer (Sun et al., 2024, arXiv 2406.06525), as
UniTok's own generation experiments use it (github.com/FoundationVision/UniTok, ``eval/llamagen``).
Everything that decides the *shape* of a generator lives here; how it is trained does not.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

HEADS = ('depth', 'parallel')
CONDITIONS = ('class', 'text')
PREFIX_ROPE = ('identity', 'zero')


class GeneratorConfigError(ValueError):
    """A generator configuration value is invalid or inconsistent."""


def ffn_hidden_dim(dim: int, mlp_ratio: float, multiple_of: int) -> int:
    """SwiGLU hidden width: 2/3 of ``mlp_ratio * dim`` (same parameters as a GELU MLP), rounded up
    to a multiple of ``multiple_of`` (LlamaGen: ratio 4, multiple 256, e.g. 768 -> 2048)."""
    hidden = int(2 * mlp_ratio * dim / 3)
    return -(-hidden // multiple_of) * multiple_of


@dataclass
class GeneratorConfig:
    """Architecture of a :class:`~unitok.generation.GeneratorModel`.

    The model reads the code grid in raster order. Each position holds ``num_codebooks`` sub-codes; the
    input embedding of a position is the sum of their embeddings, and the output head predicts them
    one after another (``head='depth'``) or independently (``head='parallel'``).
    """
    # --- code grid (must match the tokenizer whose codes are modelled) ---
    num_codebooks: int = 8               # K sub-codebooks per position
    codebook_size: int = 4096            # codes per sub-codebook
    grid: tuple[int, int] = (16, 16)     # (h, w) token grid; 256 px images with the released tokenizer
    # --- backbone ---
    dim: int = 768                       # transformer width
    depth: int = 12                      # transformer blocks
    num_heads: int = 12                  # attention heads; dim / num_heads must be a multiple of 4 (2-D rotary)
    mlp_ratio: float = 4.0               # SwiGLU hidden = multiple-of-rounded 2/3 * mlp_ratio * dim
    ffn_multiple_of: int = 256           # rounding of the SwiGLU hidden width
    norm_eps: float = 1e-5               # RMSNorm epsilon
    rope_base: float = 10000.0           # rotary frequency base
    prefix_rope: str = 'identity'        # rotary of prefix tokens: 'identity' (grid position (0, 0)), or
                                         # 'zero' (q/k zeroed, as LlamaGen does; for porting its weights)
    # --- output head ---
    head: str = 'depth'                  # 'depth': causal transformer over the K steps; 'parallel': K linears
    head_depth: int = 1                  # transformer blocks of the depth head
    head_width: int | None = None        # depth-head width; None = dim
    head_num_heads: int | None = None    # depth-head attention heads; None = num_heads when head_width == dim
    # --- condition prefix ---
    cond: str = 'class'                  # 'class': class labels; 'text': text-tower token features
    num_classes: int = 1000              # class labels 0..num_classes-1 (+ one learned null class for CFG)
    class_tokens: int = 1                # prefix tokens per class label
    text_dim: int = 768                  # width of the text features (the UniTok text tower's width)
    text_len: int = 77                   # text prefix length (the tokenizer's text context length)
    cond_dropout: float = 0.1            # training: probability to replace a condition by the null one
    # --- regularisation and init ---
    dropout: float = 0.1                 # residual and SwiGLU dropout
    token_dropout: float = 0.1           # dropout on the input embeddings
    attn_dropout: float = 0.0            # attention-probability dropout
    drop_path: float = 0.0               # stochastic depth, linearly up to this rate over the blocks
    init_std: float = 0.02               # std of the normal init of linears and embeddings

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid) if isinstance(self.grid, (list, tuple)) else self.grid
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def seq_len(self) -> int:
        """Positions of the code grid, ``h * w``."""
        return self.grid[0] * self.grid[1]

    @property
    def prefix_len(self) -> int:
        """Condition tokens before the codes."""
        return self.class_tokens if self.cond == 'class' else self.text_len

    @property
    def ffn_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.mlp_ratio, self.ffn_multiple_of)

    @property
    def depth_head_width(self) -> int:
        return self.head_width or self.dim

    @property
    def depth_head_num_heads(self) -> int:
        if self.head_num_heads:
            return self.head_num_heads
        return self.num_heads if self.depth_head_width == self.dim else max(1, self.depth_head_width // 64)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise GeneratorConfigError(f'{name} must be a positive integer, got {v!r}')

        for name in ('num_codebooks', 'codebook_size', 'dim', 'depth', 'num_heads', 'ffn_multiple_of',
                     'head_depth', 'num_classes', 'class_tokens', 'text_dim', 'text_len'):
            positive(name)
        if not (isinstance(self.grid, tuple) and len(self.grid) == 2
                and all(isinstance(g, int) and g > 0 for g in self.grid)):
            raise GeneratorConfigError(f'grid must be two positive integers (h, w), got {self.grid!r}')
        for name, choices in (('head', HEADS), ('cond', CONDITIONS), ('prefix_rope', PREFIX_ROPE)):
            if getattr(self, name) not in choices:
                raise GeneratorConfigError(f'{name} must be one of {choices}, got {getattr(self, name)!r}')
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 4:
            raise GeneratorConfigError(
                f'dim ({self.dim}) / num_heads ({self.num_heads}) must be an integer multiple of 4 '
                '(2-D rotary splits each head into row and column halves of rotation pairs)')
        for name in ('head_width', 'head_num_heads'):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise GeneratorConfigError(f'{name} must be None or a positive integer, got {v!r}')
        if self.depth_head_width % self.depth_head_num_heads:
            raise GeneratorConfigError(f'head_width ({self.depth_head_width}) must be divisible by '
                                       f'head_num_heads ({self.depth_head_num_heads})')
        if self.mlp_ratio <= 0 or self.norm_eps <= 0 or self.rope_base <= 1 or self.init_std <= 0:
            raise GeneratorConfigError('mlp_ratio, norm_eps and init_std must be > 0 and rope_base > 1')
        for name in ('cond_dropout', 'dropout', 'token_dropout', 'attn_dropout', 'drop_path'):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise GeneratorConfigError(f'{name} must be in [0, 1), got {v!r}')

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d['grid'] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'GeneratorConfig':
        if not isinstance(d, Mapping):
            raise GeneratorConfigError(f'a generator config must be a JSON object, got {type(d).__name__}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GeneratorConfigError(f'unknown GeneratorConfig field(s) {unknown}; known fields: {sorted(known)}')
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> 'GeneratorConfig':
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise GeneratorConfigError(f'invalid generator config JSON: {e}') from None

    def replace(self, **overrides) -> 'GeneratorConfig':
        """A copy with some fields changed (validated)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise GeneratorConfigError(f'unknown GeneratorConfig field(s) {unknown}')
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> 'GeneratorConfig':
        """A named preset (see :data:`GENERATOR_PRESETS`) with optional field overrides."""
        if name not in GENERATOR_PRESETS:
            raise GeneratorConfigError(f'unknown generator preset {name!r}; choose one of {sorted(GENERATOR_PRESETS)}')
        return GENERATOR_PRESETS[name].replace(**overrides)


GENERATOR_PRESETS: dict[str, GeneratorConfig] = {
    # CPU-sized: codes of the `unitok-tiny` tokenizer (8 x 512 codes, 4 x 4 grid, 128-wide text tower).
    'gen-tiny': GeneratorConfig(
        num_codebooks=8, codebook_size=512, grid=(4, 4), dim=192, depth=4, num_heads=3,
        text_dim=128, text_len=32, dropout=0.0, token_dropout=0.0),
    # LlamaGen sizes over the released tokenizer's codes (8 x 4096, 16 x 16 grid); LlamaGen's own
    # counts (one 16384-code codebook): B 111M, L 343M, XL 775M, XXL 1.4B.
    'gen-B': GeneratorConfig(dim=768, depth=12, num_heads=12),
    'gen-L': GeneratorConfig(dim=1024, depth=24, num_heads=16),
    'gen-XL': GeneratorConfig(dim=1280, depth=36, num_heads=20),
    'gen-XXL': GeneratorConfig(dim=1536, depth=48, num_heads=24),
}
