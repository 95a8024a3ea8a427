"""UniTok architecture configuration: one typed dataclass, named presets, JSON round trip,
and the converter from the official release's ``args`` dict.

Everything that decides the *shape* of a UniTok model lives here; training hyper-parameters
live in :mod:`unitok.train.config`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .modules.encoder import VITAMIN_VARIANTS
from .utils import dataclass_io
from .utils.dataclass_io import ConfigError

PROJECTIONS = ('attn', 'linear')
PATCH_SIZES = (16, 8)
__all__ = ['ConfigError', 'PRESETS', 'PROJECTIONS', 'UniTokConfig']


@dataclass
class UniTokConfig:
    """Architecture of a UniTok tokenizer.

    The latent between encoder and decoder is ``num_codebooks * code_dim`` wide; each of the
    ``num_codebooks`` chunks is snapped to one of ``codebook_size`` l2-normalised codes, so an image
    of ``H x W`` pixels becomes ``num_codebooks`` integer codes per cell of an ``H/16 x W/16`` grid.
    """
    # --- image side ---
    encoder: str = 'vitamin_large'       # ViTamin variant, a key of modules.encoder.VITAMIN_VARIANTS
    image_size: int = 256                # training resolution; inference takes any multiple of 16
    # pixels per token side: 16 (official) or 8 (the encoder's last conv keeps the size and the decoder
    # skips one up-sampling: 4x the tokens of a small image at little extra cost); not written while 16
    patch_size: int = field(default=16, metadata={'omit_if_default': True})
    num_query: int = 0                   # learned register/query tokens prepended to the token grid
    drop_path: float = 0.1               # stochastic depth (max rate) in encoder and decoder ViT blocks
    # --- quantizer ---
    # registry name (unitok.quantizers.QUANTIZERS), checked when built; not written while it is the
    # default, so config.json files and code identities of tokenizers saved before it stay the same
    quantizer: str = field(default='multi_codebook', metadata={'omit_if_default': True})
    num_codebooks: int = 8               # K sub-codebooks; the latent is split into K chunks
    codebook_size: int = 4096            # codes per sub-codebook
    code_dim: int = 8                    # width of one code; latent width = num_codebooks * code_dim
    commitment_beta: float = 0.25        # weight of ||sg(q) - z||^2 in the quantizer loss
    entropy_loss: bool = False           # also compute the codebook entropy loss (costs B*L*K*n memory)
    entropy_temperature: float = 0.01    # softmax temperature of the entropy loss
    # quantizer='fsq': levels of each dim of a group (product = codebook_size); () picks levels of 8.
    # Not written while empty, like `quantizer`.
    quantizer_levels: tuple[int, ...] = field(default=(), metadata={'omit_if_default': True})
    # --- projections and decoder ---
    projection: str = 'attn'             # 'attn': attention projection with GeGLU MLP, or 'linear'
    decoder_depth: int | None = None     # ViT blocks in the decoder; None = same as the encoder
    decoder_conv_depths: tuple[int, int] = (4, 2)  # inverted-MbConv blocks in the two up-sampling stages
    # --- text tower (open_clip TextTransformer) and CLIP head ---
    text_width: int = 768
    text_heads: int = 12
    text_layers: int = 12
    text_vocab_size: int = 49408         # open_clip BPE vocabulary
    text_context_length: int = 77
    embed_dim: int = 768                 # shared image/text embedding width
    # --- memory ---
    grad_checkpointing: bool = False     # recompute encoder/decoder/text activations in backward

    def __post_init__(self):
        dataclass_io.coerce_fields(self)      # types first (named errors), then the value rules
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def latent_dim(self) -> int:
        """Width of the quantized latent (all sub-codebooks together)."""
        return self.num_codebooks * self.code_dim

    @property
    def vocab_size(self) -> int:
        """Codes over all sub-codebooks (the official ``vocab_size``)."""
        return self.num_codebooks * self.codebook_size

    @property
    def encoder_dim(self) -> int:
        return VITAMIN_VARIANTS[self.encoder].embed_dim

    @property
    def grid_size(self) -> int:
        """Token grid side at ``image_size``."""
        return self.image_size // self.patch_size

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f'{name} must be a positive integer, got {v!r}')

        if not isinstance(self.quantizer, str) or not self.quantizer:
            raise ConfigError(f'quantizer must be a registered quantizer name, got {self.quantizer!r}')
        if self.encoder not in VITAMIN_VARIANTS:
            raise ConfigError(f'unknown encoder {self.encoder!r}; choose one of {sorted(VITAMIN_VARIANTS)}')
        for name in ('image_size', 'num_codebooks', 'codebook_size', 'code_dim', 'text_width', 'text_heads',
                     'text_layers', 'text_vocab_size', 'text_context_length', 'embed_dim'):
            positive(name)
        if self.patch_size not in PATCH_SIZES:
            raise ConfigError(f'patch_size must be one of {PATCH_SIZES}, got {self.patch_size!r}')
        if self.image_size % 16:
            raise ConfigError(f'image_size must be a multiple of 16 (the encoder downsamples 16x), got {self.image_size}')
        if not isinstance(self.num_query, int) or self.num_query < 0:
            raise ConfigError(f'num_query must be a non-negative integer, got {self.num_query!r}')
        if self.projection not in PROJECTIONS:
            raise ConfigError(f'projection must be one of {PROJECTIONS}, got {self.projection!r}')
        if self.projection == 'attn':
            c, w = self.encoder_dim, self.latent_dim
            if c % w and w % c:
                raise ConfigError(f"projection='attn' needs the encoder width ({c}) and the latent width "
                                  f'num_codebooks*code_dim ({w}) to divide one another')
            if c // w < 1:
                raise ConfigError(f"projection='attn' needs a latent ({w}) no wider than the encoder ({c})")
        if self.decoder_depth is not None and (not isinstance(self.decoder_depth, int) or self.decoder_depth < 1):
            raise ConfigError(f'decoder_depth must be None or a positive integer, got {self.decoder_depth!r}')
        if len(self.decoder_conv_depths) != 2 or min(self.decoder_conv_depths) < 1:
            raise ConfigError(f'decoder_conv_depths must be two positive integers, got {self.decoder_conv_depths}')
        if self.text_width % self.text_heads:
            raise ConfigError(f'text_width ({self.text_width}) must be divisible by text_heads ({self.text_heads})')
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f'drop_path must be in [0, 1), got {self.drop_path}')
        if any(not isinstance(v, int) or v < 2 for v in self.quantizer_levels):
            raise ConfigError(f'quantizer_levels must be integers >= 2, got {list(self.quantizer_levels)}')
        if self.commitment_beta < 0 or self.entropy_temperature <= 0:
            raise ConfigError('commitment_beta must be >= 0 and entropy_temperature > 0')

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclass_io.to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = '') -> 'UniTokConfig':
        """Build from a plain mapping; every value is type-checked (see :mod:`unitok.utils.dataclass_io`)."""
        return dataclass_io.from_dict(cls, d, where)

    def to_json(self, path: str | None = None) -> str:
        """The config as JSON text; with ``path`` also written there (atomically)."""
        s = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            from .utils.io import atomic_write
            atomic_write(path, lambda f: f.write(s + '\n'), mode='w', what='model config')
        return s

    @classmethod
    def from_json(cls, path_or_text: str) -> 'UniTokConfig':
        """From JSON text (starting with ``{``) or a JSON file; errors name the file and the field."""
        if path_or_text.lstrip().startswith('{'):
            try:
                data = json.loads(path_or_text)
            except json.JSONDecodeError as e:
                raise ConfigError(f'invalid config JSON: {e}') from None
            return cls.from_dict(data)
        data = dataclass_io.read_mapping(path_or_text, what='model config')
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f'{path_or_text}: {e}') from None

    def replace(self, **overrides) -> 'UniTokConfig':
        """A copy with some fields changed (validated)."""
        return self.from_dict({**self.to_dict(), **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> 'UniTokConfig':
        """A named preset (see :data:`PRESETS`) with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f'unknown preset {name!r}; choose one of {sorted(PRESETS)}')
        return PRESETS[name].replace(**overrides)

    @classmethod
    def from_official_args(cls, args: Mapping[str, Any]) -> 'UniTokConfig':
        """Convert the official ``Args`` dict stored in a released checkpoint.

        The official code counts ``vocab_size`` and ``vocab_width`` over *all* codebooks;
        here they are per sub-codebook (``codebook_size``, ``code_dim``).
        """
        defaults = _OFFICIAL_DEFAULTS

        def get(k):
            return args.get(k, defaults[k])

        k = int(get('num_codebooks'))
        vocab, width = int(get('vocab_size')), int(get('vocab_width'))
        if k <= 0 or vocab % k or width % k:
            raise ConfigError(f'official args: vocab_size={vocab} and vocab_width={width} must both be '
                              f'divisible by num_codebooks={k}')
        encoder = str(get('model'))
        if encoder not in VITAMIN_VARIANTS:
            raise ConfigError(f'official args: unknown model {encoder!r}; supported: {sorted(VITAMIN_VARIANTS)}')
        return cls(
            encoder=encoder,
            image_size=int(get('img_size')),
            num_query=int(get('num_query')),
            drop_path=float(get('drop_path')),
            num_codebooks=k,
            codebook_size=vocab // k,
            code_dim=width // k,
            commitment_beta=float(get('vq_beta')),
            entropy_loss=float(get('le')) > 0,
            entropy_temperature=float(get('e_temp')),
            projection=str(get('quant_proj')),
            text_width=int(get('text_width')),
            text_heads=int(get('text_heads')),
            text_layers=int(get('text_layers')),
            text_vocab_size=int(get('text_vocab_size')),
            text_context_length=int(get('text_context_length')),
            embed_dim=int(get('embed_dim')),
            decoder_depth=args.get('unitok_decoder_depth'),
            decoder_conv_depths=tuple(args.get('unitok_decoder_conv_depths', (4, 2))),
            patch_size=int(args.get('unitok_patch_size', 16)),
        )

    def to_official_args(self) -> dict[str, Any]:
        """The architecture part of the official ``Args`` dict (inverse of :meth:`from_official_args`).

        Decoder depths the official code cannot express travel as extra ``unitok_*`` keys (the official
        ``Args`` ignores them, so only our loader rebuilds such a model).
        """
        extra = {}
        if self.patch_size != 16:
            extra['unitok_patch_size'] = self.patch_size
        if self.decoder_depth not in (None, VITAMIN_VARIANTS[self.encoder].depth):
            extra['unitok_decoder_depth'] = self.decoder_depth
        if self.decoder_conv_depths != (4, 2):
            extra['unitok_decoder_conv_depths'] = list(self.decoder_conv_depths)
        return extra | dict(
            model=self.encoder, img_size=self.image_size, num_query=self.num_query, drop_path=self.drop_path,
            num_codebooks=self.num_codebooks, vocab_size=self.vocab_size, vocab_width=self.latent_dim,
            vq_beta=self.commitment_beta, le=1.0 if self.entropy_loss else 0.0, e_temp=self.entropy_temperature,
            quant_proj=self.projection, text_width=self.text_width, text_heads=self.text_heads,
            text_layers=self.text_layers, text_vocab_size=self.text_vocab_size,
            text_context_length=self.text_context_length, embed_dim=self.embed_dim,
        )


# Defaults of the official `Args` class for the fields that shape the model.
_OFFICIAL_DEFAULTS = dict(
    model='vitamin_large', img_size=256, num_query=0, drop_path=0.1, num_codebooks=8, vocab_size=32768,
    vocab_width=64, vq_beta=0.25, le=0.0, e_temp=0.01, quant_proj='attn', text_width=768, text_heads=12,
    text_layers=12, text_vocab_size=49408, text_context_length=77, embed_dim=768,
)

PRESETS: dict[str, UniTokConfig] = {
    # The released checkpoint: ViTamin-L, 256 px, 8 x 4096 codes of 8 dims, 16x16 tokens.
    'unitok-large': UniTokConfig(),
    # ViTamin-B with the same quantizer.
    'unitok-base': UniTokConfig(encoder='vitamin_base'),
    # Small enough to train on two CPU cores at 64 px in minutes (4x4 tokens of 8 x 512 codes).
    'unitok-tiny': UniTokConfig(
        encoder='vitamin_tiny', image_size=64, drop_path=0.0,
        num_codebooks=8, codebook_size=512, code_dim=4,
        decoder_conv_depths=(1, 1),
        text_width=128, text_heads=2, text_layers=2, text_context_length=32, embed_dim=128,
    ),
    # unitok-tiny with 8 px patches: 8x8 tokens of a 64 px image without up-sampling it (the demo's).
    'unitok-tiny-p8': UniTokConfig(
        encoder='vitamin_tiny', image_size=64, patch_size=8, drop_path=0.0,
        num_codebooks=8, codebook_size=512, code_dim=4,
        decoder_conv_depths=(1, 1),
        text_width=128, text_heads=2, text_layers=2, text_context_length=32, embed_dim=128,
    ),
}
