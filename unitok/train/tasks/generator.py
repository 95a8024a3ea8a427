"""Training the autoregressive generator on exported UniTok codes, as a task of the one loop.

Data: a directory written by ``unitok export-codes`` (memory-mapped uint16 shards). Each training
sample takes one augmentation view of an item, drawn from the per-sample seeded RNG, so a resumed run
sees exactly the views of the uninterrupted one. Objective: :meth:`GeneratorModel.loss` (mean
cross-entropy over all K*L sub-codes, the condition dropped to the null one at ``cond_dropout``).
Validation: held-out NLL per sub-codebook on the exported validation codes. Images: samples per
class decoded by the tokenizer, when one is given.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ...checkpoint import CheckpointError
from ...config import ConfigError
from ...data import TrainStream
from ...generation import GeneratorConfig, GeneratorModel, generate, text_condition
from ...codes import CodeDataset, check_agreement
from ..adapters import CodesSource, Objective
from ..config import BaseOptimConfig, CodesDataConfig, CodesRunConfig
from ..task import Phase, Task
from .tokenizer import param_groups

log = logging.getLogger('unitok.train')
GENERATION_INFO = 'generation.json'      # beside the exported generator: classes, tokenizer, codes identity


@dataclass
class GenDataConfig(CodesDataConfig):
    label: str | None = None             # label set of the export to condition on (default: its first)


def _gen_optim() -> BaseOptimConfig:
    # LlamaGen's recipe: AdamW (0.9, 0.95), weight decay 0.05, clip 1.0; here with a short warm-up and
    # cosine decay to 10%, and an EMA of the weights.
    return BaseOptimConfig(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup=0.02, end_ratio=0.1,
                           grad_clip=1.0, ema=0.999)


@dataclass
class GenTrainConfig(CodesRunConfig):
    """Training a :class:`~unitok.generation.GeneratorModel` (the :class:`GeneratorTask`)."""
    preset: str = 'gen-tiny'
    model: dict = field(default_factory=dict)   # GeneratorConfig overrides (K, codes, grid, classes: from the codes)
    tokenizer: str | None = None         # UniTok model dir: text conditions, sample images, code-embedding init
    init_code_embeddings: bool = False   # initialise input embeddings from the tokenizer's code vectors
    sample_cfg: float = 1.0              # guidance scale of the sample grids written during training
    sample_classes: int = 8              # classes shown in the sample grids (rows)
    out: str = 'runs/generator'
    precision: str = 'bf16'
    eval_batches: int = 8
    data: GenDataConfig = field(default_factory=GenDataConfig)
    optim: BaseOptimConfig = field(default_factory=_gen_optim)

    def make_task(self) -> 'GeneratorTask':
        return GeneratorTask(self)


class GeneratorTask(Task):
    name = 'generator'
    progress_keys = ('loss', 'accuracy', 'lr')

    def __init__(self, cfg: GenTrainConfig):
        self.cfg = cfg
        self.train_codes = CodeDataset(cfg.data.train, view='all', label=cfg.data.label, caption='random')
        self.val_codes = CodeDataset(cfg.data.val, view=0, label=cfg.data.label) if cfg.data.val else None
        self.tokenizer = None
        if cfg.tokenizer:
            from ...model import UniTok
            self.tokenizer = UniTok.from_pretrained(cfg.tokenizer).eval().requires_grad_(False)
            self.train_codes.check_tokenizer(self.tokenizer)
        if self.val_codes is not None:
            _same_codes(self.train_codes, self.val_codes)
        gen_cfg = self._model_config()
        self.model = GeneratorModel(gen_cfg)
        if cfg.init_code_embeddings:
            if self.tokenizer is None:
                raise ConfigError('init_code_embeddings needs the tokenizer (--tokenizer)')
            self.model.init_code_embeddings(self.tokenizer.quantizer.code_table().detach(), seed=cfg.seed)

    def _model_config(self) -> GeneratorConfig:
        ds, overrides = self.train_codes, dict(self.cfg.model)
        fixed = dict(num_codebooks=ds.num_codebooks, codebook_size=ds.codebook_size, grid=tuple(ds.grid))
        clash = {k: (overrides[k], v) for k, v in fixed.items() if k in overrides and tuple(
            overrides[k] if isinstance(overrides[k], (list, tuple)) else [overrides[k]]) != tuple(
            v if isinstance(v, tuple) else [v])}
        if clash:
            raise ConfigError(f'model overrides contradict the exported codes (override, codes): {clash}')
        base = GeneratorConfig.from_preset(self.cfg.preset)
        cond = overrides.get('cond', base.cond)
        if cond == 'class':
            if not ds.classnames:
                raise ConfigError(f'{self.cfg.data.train!r} has no class labels: train a text-conditional '
                                  'generator (model.cond=text with --tokenizer) or export labelled data')
            fixed['num_classes'] = len(ds.classnames)
        else:
            if self.tokenizer is None:
                raise ConfigError('a text-conditional generator needs the tokenizer whose text tower encodes the '
                                  'captions (--tokenizer)')
            tc = self.tokenizer.config
            fixed.update(text_dim=self.tokenizer.text_encoder.transformer.width, text_len=tc.text_context_length)
        return base.replace(**{**overrides, **fixed})

    def default_parallel(self, info) -> str:
        return 'fsdp' if info.enabled and self.model.config.dim >= 1280 else 'ddp'

    def setup(self, strategy) -> None:
        oc = self.cfg.optim
        self.strategy = strategy
        if self.tokenizer is not None:
            self.tokenizer.to(strategy.device)
        self.wrapped = strategy.wrap(Objective(self.model, 'loss'), owner=self.model,
                                     shard_units=list(self.model.blocks))
        if self.cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.warmup_steps = round(oc.warmup * self.cfg.steps)
        optimizer = torch.optim.AdamW(param_groups(self.model, oc.weight_decay), lr=oc.lr, betas=oc.betas, eps=oc.eps)
        self._phases = [Phase('model', self.model, optimizer, self.lr)]

    # ------------------------------------------------------------------ data and loss
    def train_stream(self, rank, world_size, num_workers, start_positions, worker_offset):
        views = self.train_codes.num_views
        text = self.model.config.cond == 'text'
        context = self.tokenizer.config.text_context_length if text else 0

        def prepare(item):
            view = int(torch.randint(views, ())) if views > 1 else 0      # seeded per sample by the stream
            sample = {'codes': item['codes'][view], 'label': item['label']}
            if text:
                from ...modules.text import tokenize
                sample['text'] = tokenize(item['caption'], context)[0]
            return sample
        return TrainStream(CodesSource(self.train_codes), prepare=prepare, seed=self.cfg.seed, rank=rank,
                           world_size=world_size, num_workers=num_workers, start_positions=start_positions,
                           worker_offset=worker_offset)

    def condition(self, batch: dict):
        if self.model.config.cond == 'class':
            return batch['label']
        with torch.no_grad():
            return text_condition(self.tokenizer, batch['text'])

    def loss(self, phase, batch, step):
        return self.wrapped(batch['codes'], self.condition(batch))

    # ------------------------------------------------------------------ validation, images, export
    @torch.no_grad()
    def validate(self, strategy) -> dict[str, float]:
        """Held-out NLL per sub-codebook (nats) on the first ``eval_batches * batch_size`` items."""
        from ...eval.metrics.nll import codebook_nll, weighted_means, weighted_sums
        if self.val_codes is None:
            return {}
        bs, K = self.cfg.data.batch_size, self.model.config.num_codebooks
        n = min(len(self.val_codes), self.cfg.eval_batches * bs)
        mine = list(range(strategy.rank, n, strategy.world_size))
        sums = torch.zeros(K + 2, dtype=torch.float64, device=strategy.device)     # nll_k..., accuracy, count
        names = [f'nll_{k}' for k in range(K)] + ['accuracy']
        text = self.model.config.cond == 'text'
        for s in range(0, len(mine), bs):
            items = [self.val_codes[i] for i in mine[s:s + bs]]
            batch = {'codes': torch.stack([it['codes'] for it in items]).to(strategy.device),
                     'label': torch.tensor([it['label'] for it in items], device=strategy.device)}
            if text:
                from ...modules.text import tokenize
                batch['text'] = tokenize([it['caption'] for it in items],
                                         self.tokenizer.config.text_context_length).to(strategy.device)
            _, m = self.model.loss(batch['codes'], self.condition(batch))
            sums += weighted_sums([m[name] for name in names], len(items))
        strategy.all_reduce(sums)
        out = codebook_nll(sums, K)
        out.update(accuracy=weighted_means(sums[K:], ['accuracy'])['accuracy'], samples=max(1.0, float(sums[K + 1])))
        return out

    @torch.no_grad()
    def save_images(self, strategy, path, averaged=None) -> bool:
        """A grid: one row per class (the first ``sample_classes``), 8 samples each, EMA weights."""
        if self.tokenizer is None or self.model.config.cond != 'class' or not strategy.is_main:
            return False
        classes = min(self.cfg.sample_classes, self.model.config.num_classes)
        labels = torch.arange(classes, device=strategy.device).repeat_interleave(8)
        with averaged() if averaged is not None else nullcontext():
            codes = generate(self.model, labels, cfg_scale=self.cfg.sample_cfg, generator=self.cfg.seed)
        images = self.tokenizer.decode(codes)
        from ...images import make_grid
        from ...utils.io import atomic_write
        grid = make_grid(list(images.view(classes, 8, *images.shape[1:])))
        atomic_write(path, lambda f: grid.save(f, format='PNG'), what='sample grid')
        return True

    def export(self, state: dict, directory: str) -> None:
        model = GeneratorModel(self.model.config)
        model.load_state_dict(state)
        model.save_pretrained(directory)
        info = {'classnames': self.train_codes.classnames, 'label_set': self.cfg.data.label,
                'tokenizer': os.path.abspath(self.cfg.tokenizer) if self.cfg.tokenizer else None,
                'codes': os.path.abspath(self.cfg.data.train), 'codes_tokenizer': self.train_codes.manifest['tokenizer']}
        from ...utils.io import atomic_write
        atomic_write(os.path.join(directory, GENERATION_INFO), lambda f: json.dump(info, f, indent=2), mode='w',
                     what='generation info')

    def check_resume(self, saved_config: dict) -> None:
        saved = GenTrainConfig.from_dict(saved_config)
        if saved.preset != self.cfg.preset or saved.model != self.cfg.model or saved.data.train != self.cfg.data.train:
            raise CheckpointError('cannot resume: the generator architecture or its codes differ from the '
                                  f'checkpoint\'s (preset {saved.preset!r}, model {saved.model}, codes '
                                  f'{saved.data.train!r}); start a new run')

    def describe(self) -> str:
        c = self.model.config
        total = sum(p.numel() for p in self.model.parameters())
        return (f'generator {self.cfg.preset}: {total / 1e6:.1f} M parameters, {c.head} head, {c.cond}-conditional; '
                f'{len(self.train_codes)} code items x {self.train_codes.num_views} views from {self.cfg.data.train} '
                f'({c.num_codebooks} x {c.codebook_size} codes, grid {c.grid[0]}x{c.grid[1]}); held-out: '
                f'{self.cfg.data.val or "none"}')


def _same_codes(a: CodeDataset, b: CodeDataset) -> None:
    check_agreement(b.manifest['tokenizer'], a.manifest['tokenizer'], where=f'the held-out codes {b.directory!r}',
                    consumer=f'the training codes {a.directory!r}', error=ConfigError)
    if a.classnames != b.classnames:
        raise ConfigError(f'the held-out codes {b.directory!r} have other class names than the training codes')

