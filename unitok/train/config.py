"""Training configuration: typed dataclasses with the official UniTok recipe as defaults.

A YAML/JSON file is a serialisation of :class:`TrainConfig` (nested sections as mappings); command
line overrides are dotted ``key=value`` pairs, e.g. ``optim.lr=1e-3 loss.perceptual=none``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import yaml

from ..config import ConfigError, UniTokConfig
from ..utils import dataclass_io


@dataclass
class DataConfig:
    train: str = 'builtin:emoji'         # data spec (see unitok.data): builtin:NAME, wds shards, folder
    val: str | None = None               # held-out data; None: the 'val' split of `train` when it has one
    batch_size: int = 32                 # images per rank and micro-step
    recon_batch_size: int | None = None  # reconstruction losses on the first k images (official vae_local_bs); None: all
    num_workers: int = 2                 # loader processes per rank (0: load in the training process)
    crop_scale: tuple[float, float] = (0.9, 1.0)   # random-resized-crop scale range (official)
    hflip: bool = False
    shuffle_buffer: int = 1000           # webdataset in-stream shuffle buffer
    resampled: bool = True               # webdataset: draw shards with replacement

    def __post_init__(self):
        dataclass_io.coerce_fields(self)


@dataclass
class CodesDataConfig:
    """Data of the tasks that train on exported codes (`unitok export-codes` directories)."""
    train: str = ''                      # export directory of the training codes
    val: str | None = None               # export directory of held-out codes (None: no validation)
    batch_size: int = 32                 # items per rank and micro-step
    num_workers: int = 0                 # loader processes per rank (codes are memory-mapped: 0 is fine)

    def __post_init__(self):
        dataclass_io.coerce_fields(self)


@dataclass
class LossConfig:
    l1: float = 0.2
    l2: float = 1.0
    perceptual: str = 'auto'             # 'lpips-vgg' | 'effnet-lite0' | 'none' | 'auto' (LPIPS if lpips_path else EffNet)
    perceptual_weight: float = 1.0
    perceptual_min_size: int = 48        # only at or above this resolution (official)
    lpips_path: str | None = None        # VGG16 / official lpips_with_vgg.pth weights
    discriminator: str = 'auto'          # 'dino' | 'patchgan' | 'none' | 'auto' (DINO if dino_path else PatchGAN)
    dino_path: str | None = None         # DINOv2 ViT-S/14 weights
    adversarial_weight: float = 0.4
    adaptive_weight: bool = True         # scale the GAN loss by the grad-norm ratio at the decoder's last layer
    adaptive_clamp: tuple[float, float] = (0.015, 1e4)
    disc_start: float = 0.375            # fraction of the steps before the GAN loss starts
    disc_warmup: float = 0.03            # fraction of the steps over which it ramps up
    diffaug_prob: float = 1.0
    bcr: float = 4.0                     # balanced consistency regularisation weight
    bcr_cutout: float = 0.2
    quantizer: float = 1.0
    entropy: float = 0.0                 # > 0 turns on the quantizer's entropy loss
    clip: float = 1.0
    local_loss: bool = True
    gather_with_grad: bool = True

    def __post_init__(self):
        dataclass_io.coerce_fields(self)


@dataclass
class BaseOptimConfig:
    """The optimisation settings every task has; the loop reads ``grad_clip``, ``grad_accum`` and ``ema``."""
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    eps: float = 1e-6
    warmup: float = 0.01                 # fraction of the steps with linear warm-up
    start_ratio: float = 0.0             # lr at step 0, relative
    end_ratio: float = 0.1               # final lr of the cosine schedule, relative
    grad_clip: float = 10.0              # <= 0: off
    grad_accum: int = 1                  # micro-steps per optimizer step
    ema: float = 0.9999                  # weight EMA decay (0: off); warmed up as min(decay, (1+t)/(10+t))

    def __post_init__(self):
        dataclass_io.coerce_fields(self)


@dataclass
class OptimConfig(BaseOptimConfig):
    disc_lr: float = 2e-5
    disc_betas: tuple[float, float] = (0.5, 0.9)
    disc_weight_decay: float = 0.2
    disc_end_ratio: float = 0.1


@dataclass
class RunConfig:
    """What the one training loop (:mod:`unitok.train.loop`) reads, shared by every task's config.

    A task config subclasses it and adds ``data`` (with ``batch_size`` and ``num_workers``), ``optim``
    (a :class:`BaseOptimConfig`) and its own sections.
    """
    out: str = 'runs/unitok'
    steps: int = 1000
    seed: int = 0
    precision: str = 'bf16'              # 'bf16' | 'fp32' | 'fp16' (fp16: CUDA with a grad scaler)
    compile: bool = False                # torch.compile the model
    parallel: str = 'auto'               # 'auto' | 'ddp' | 'fsdp' (FSDP2 sharding); auto: the task's choice
    threads: int | None = None           # CPU threads per process
    log_every: int = 10
    eval_every: int = 100                # held-out validation
    eval_batches: int = 4
    image_every: int = 100               # sample / reconstruction grid PNG
    ckpt_every: int = 100
    keep_last: int = 3
    wandb: bool = False

    def __post_init__(self):
        dataclass_io.coerce_fields(self)   # named type errors; value rules in validate()

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f'steps must be >= 1, got {self.steps}')
        if self.precision not in ('bf16', 'fp32', 'fp16'):
            raise ConfigError(f"precision must be 'bf16', 'fp32' or 'fp16', got {self.precision!r}")
        if self.parallel not in ('auto', 'ddp', 'fsdp'):
            raise ConfigError(f"parallel must be 'auto', 'ddp' or 'fsdp', got {self.parallel!r}")
        for name in ('log_every', 'eval_every', 'image_every', 'ckpt_every', 'eval_batches'):
            if getattr(self, name) < 0:
                raise ConfigError(f'{name} must be >= 0 (0 = never)')
        data, optim = getattr(self, 'data', None), getattr(self, 'optim', None)
        if data is not None and (data.batch_size < 1 or data.num_workers < 0):
            raise ConfigError('data.batch_size must be >= 1 and data.num_workers >= 0')
        if optim is not None and optim.grad_accum < 1:
            raise ConfigError('optim.grad_accum must be >= 1')
        if optim is not None and not (math.isfinite(optim.lr) and optim.lr > 0):
            raise ConfigError(f'optim.lr must be a positive finite number, got {optim.lr}')

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclass_io.to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'RunConfig':
        """Build from a plain mapping; every value is type-checked (see :mod:`unitok.utils.dataclass_io`)."""
        return dataclass_io.from_dict(cls, d)

    @classmethod
    def load(cls, path: str) -> 'RunConfig':
        """Read a YAML (``.yaml``/``.yml``) or JSON file; errors name the file and the field."""
        data = dataclass_io.read_mapping(path, what='training config')
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f'{path}: {e}') from None

    def save(self, path: str) -> None:
        """Write YAML (``.yaml``/``.yml``) or JSON, atomically (ASCII either way)."""
        from ..utils.io import atomic_write
        if path.endswith(('.yaml', '.yml')):
            atomic_write(path, lambda f: yaml.safe_dump(self.to_dict(), f, sort_keys=False), mode='w')
        else:
            atomic_write(path, lambda f: json.dump(self.to_dict(), f, indent=2), mode='w')

    def override(self, assignments: list[str]) -> 'RunConfig':
        """A copy with dotted ``key=value`` overrides (values parsed as YAML scalars/lists)."""
        d = self.to_dict()
        for a in assignments:
            if '=' not in a:
                raise ConfigError(f'override {a!r} is not key=value')
            key, value = a.split('=', 1)
            node, parts = d, key.split('.')
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f'unknown config section {p!r} in {key!r}')
                node = node[p]
            if parts[-1] not in node and not (len(parts) == 2 and parts[0] == 'model'):
                raise ConfigError(f'unknown config key {key!r}')
            node[parts[-1]] = dataclass_io.parse_override(value, dataclass_io.field_hint(type(self), parts), key)
        return type(self).from_dict(d)


@dataclass
class TrainConfig(RunConfig):
    """Training a UniTok tokenizer (the :class:`~unitok.train.tasks.tokenizer.TokenizerTask`)."""
    preset: str = 'unitok-tiny'
    model: dict = field(default_factory=dict)   # UniTokConfig overrides
    init: str | None = None              # start from these weights (model dir or official .pth)
    grad_checkpointing: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def model_config(self) -> UniTokConfig:
        """The model architecture: the preset with the ``model`` overrides (errors name ``model.FIELD``)."""
        base = UniTokConfig.from_preset(self.preset)
        return UniTokConfig.from_dict({**base.to_dict(), **self.model}, where='model.')

    def validate(self) -> None:
        self.model_config()
        super().validate()
        # One meaning everywhere (as in UniTok.forward): None = all images; training needs >= 1.
        if self.data.recon_batch_size is not None and self.data.recon_batch_size < 1:
            raise ConfigError(f'data.recon_batch_size must be null (all images) or >= 1, got '
                              f'{self.data.recon_batch_size} (training needs reconstructions)')
        lo, hi = self.data.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f'data.crop_scale must be [min, max] with 0 < min <= max <= 1, got {[lo, hi]}')
        if self.data.shuffle_buffer < 0:
            raise ConfigError(f'data.shuffle_buffer must be >= 0, got {self.data.shuffle_buffer}')



@dataclass
class CodesRunConfig(RunConfig):
    """A run that trains on exported codes: ``data.train`` (``--codes``) names their directory."""
    codes_needed: ClassVar[str] = 'exported codes'     # what that directory must hold (error message)

    def validate(self) -> None:
        super().validate()
        if not self.data.train:
            raise ConfigError(f'data.train (--codes): the directory of {self.codes_needed} is required')
