"""Evaluation of a class-conditional generator over UniTok codes (``unitok eval-gen``).

At every guidance scale, on samples decoded by the tokenizer and seen as uint8 images: Fréchet
distance, KID with its subsampling interval and precision / recall against held-out images
(``fd_inception`` alone is an FID), condition consistency through the tokenizer's zero-shot head and
a linear probe (with shuffled-label controls), and the copy rate against the training images. Beside
them: the floors ``real_vs_real`` and ``reconstruction_vs_real``, ceilings, and the held-out NLL.

Two stages: sampling (:class:`~unitok.eval.samples.Sampler`) writes each scale's codes to a samples
file ``OUT/samples/cfg-<scale>.npz`` (reused when its header matches), then measuring reads them back.
Samples are planned (:func:`~unitok.eval.sampling.sample_chunks`): chunk ``i`` is one ``generate``
call seeded with ``mix_seed(seed, i)``, the same seeds at every scale, and is decoded as one chunk, so
no number depends on ``batch_size``, which batches only the feature extractors. Under several
processes chunk ``i`` goes to rank ``i % world``; statistics are computed once over the gathered
features in sample order, in float64.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from ..codes import check_agreement, code_space
from ..data import eval_transform
from ..images import to_uint8_tensor
from ..utils import distributed as D
from .features import EXTRACTORS, build_extractors, extract
from .loading import GenEvalError, load_generator
from .subsets import read_images, subset_indices
from .metrics import (LinearProbe, codebook_nll, consistency, copy_statistics, distribution_metrics, kid_interval,
                      precision_recall, weighted_sums)
from .report import write_generation_report
from .samples import Sampler
from .sampling import gather_rows, progress_bar, rebatch, sample_chunks

log = logging.getLogger(__name__)

__all__ = ['GenEvalConfig', 'GenEvalError', 'GenEvalResult', 'evaluate_generator', 'run_generator_evaluation',
           'load_generator', 'write_generation_report', 'sample_chunks', 'consistency', 'copy_statistics',
           'kid_interval', 'precision_recall', 'LinearProbe']


@dataclass
class GenEvalConfig:
    """Protocol of :func:`evaluate_generator` (recorded in the report)."""
    samples_per_class: int = 50          # samples of every class at every guidance scale
    cfg_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)   # guidance sweep (1: guidance-free)
    temperature: float = 1.0             # sampling temperature (0: greedy)
    top_k: int = 0                       # 0: no top-k filter
    top_p: float = 1.0                   # 1: no nucleus filter
    seed: int = 0                        # seeds of the sample chunks, the subsets and the label control
    chunk_size: int = 16                 # samples per generator / tokenizer call (decides the samples)
    batch_size: int = 32                 # feature-extractor batches (changes no number)
    extractors: tuple[str, ...] = ('effnet-lite0',)   # the first also serves the probe and the copy rate
    inception_weights: str | None = None
    dinov2_weights: str | None = None
    pr_k: int = 3                        # neighbourhood size of precision / recall
    kid_subsets: int = 100               # random subsets of the KID interval
    kid_subset_size: int = 1000          # at most; capped at half the smaller set
    copy_percentile: float = 1.0         # percentile of held-out-to-train NN distances below which a sample is a copy
    max_real: int | None = None          # held-out images: a fixed class-balanced subset of this size
    max_train: int | None = None         # train images (probe, copy rate, real-vs-real floor): likewise
    templates: tuple[str, ...] | None = None   # zero-shot prompt templates with {}; default: the source's
    probe_l2: float = 1e-3               # L2 weight of the logistic-regression probe (on standardised features)
    probe_iters: int = 200               # L-BFGS iterations of the probe
    image_size: int | None = None        # real images are resized to this (default: the tokenizer's)
    grid_samples: int = 8                # samples per class kept for the report's grids

    def validate(self) -> None:
        for name in ('samples_per_class', 'chunk_size', 'batch_size', 'pr_k', 'kid_subsets', 'kid_subset_size',
                     'probe_iters', 'max_real', 'max_train', 'image_size'):
            v = getattr(self, name)
            if (v is not None or name not in ('max_real', 'max_train', 'image_size')) and (
                    isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise GenEvalError(f'GenEvalConfig.{name} must be a positive integer, got {v!r}')
        if isinstance(self.extractors, str) or not self.extractors:
            raise GenEvalError('GenEvalConfig.extractors must be a non-empty sequence of names, e.g. ("effnet-lite0",)')
        unknown = [e for e in self.extractors if e not in EXTRACTORS]
        if unknown:
            raise GenEvalError(f'unknown feature extractor(s) {unknown}; choose from {EXTRACTORS}')
        scales = tuple(self.cfg_scales) if isinstance(self.cfg_scales, (list, tuple)) else None
        if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
                             or s < 0 for s in scales) or len(set(scales)) != len(scales):
            raise GenEvalError(f'GenEvalConfig.cfg_scales must be distinct finite numbers >= 0, got {self.cfg_scales!r}')
        if not 0 < self.copy_percentile < 100:
            raise GenEvalError(f'GenEvalConfig.copy_percentile must be in (0, 100), got {self.copy_percentile!r}')
        if not self.probe_l2 >= 0:
            raise GenEvalError(f'GenEvalConfig.probe_l2 must be >= 0, got {self.probe_l2!r}')
        if isinstance(self.grid_samples, bool) or not isinstance(self.grid_samples, int) or self.grid_samples < 0:
            raise GenEvalError(f'GenEvalConfig.grid_samples must be an integer >= 0, got {self.grid_samples!r}')
        for t in self.templates or ():
            if not isinstance(t, str) or '{}' not in t:
                raise GenEvalError(f'zero-shot template {t!r} has no {{}} for the class name')


@dataclass
class GenEvalResult:
    metrics: dict                                               # report.json's content (stable keys)
    grids: dict[float, torch.Tensor] = field(default_factory=dict)   # cfg scale -> (C, g, 3, H, W) in [-1, 1]
    classnames: list[str] = field(default_factory=list)


def _distribution(real: torch.Tensor, fake: torch.Tensor, name: str, cfg: GenEvalConfig) -> dict[str, float]:
    return distribution_metrics(real, fake, name, pr_k=cfg.pr_k, kid_subsets=cfg.kid_subsets,
                                kid_subset_size=cfg.kid_subset_size, seed=cfg.seed)


def _check_inputs(generator, tokenizer, real_source, train_source, classnames):
    gc, tc = generator.config, tokenizer.config
    if gc.cond != 'class':
        raise GenEvalError('eval-gen evaluates class-conditional generators; this one is text-conditional')
    check_agreement(code_space(gc), tokenizer, where='the generator', consumer='the tokenizer',
                    there='in the generator', skip=('grid',), error=GenEvalError,
                    fix='not the tokenizer of its codes')
    if tc.num_query:
        raise GenEvalError('eval-gen needs a tokenizer without query tokens (num_query = 0)')
    for name, source in (('held-out', real_source), ('train', train_source)):
        if not hasattr(source, 'read'):
            raise GenEvalError(f'the {name} data must be a map-style source (builtin:NAME or a folder), '
                               'not streamed shards')
        names = getattr(source, 'classnames', None)
        if not names or getattr(source, 'labels', None) is None:
            raise GenEvalError(f'the {name} data has no class labels: condition consistency needs them')
        if list(names) != list(classnames):
            raise GenEvalError(f'the {name} data has other classes ({len(names)}: {list(names)[:5]}...) than the '
                               f'generator ({len(classnames)}: {list(classnames)[:5]}...); pass the data spec of '
                               'its label set, e.g. builtin:emoji:subcategory')
    if len(classnames) != gc.num_classes:
        raise GenEvalError(f'{len(classnames)} class names for a generator of {gc.num_classes} classes')


@torch.no_grad()
def evaluate_generator(generator, tokenizer, real_source, train_source, cfg: GenEvalConfig | None = None,
                       classnames: Sequence[str] | None = None, val_codes=None, progress: bool = False,
                       process_group=None, samples_dir: str | None = None,
                       generator_path: str | None = None) -> GenEvalResult:
    """Evaluate a class-conditional :class:`~unitok.generation.GeneratorModel` (see the module docstring).

    Args:
        generator, tokenizer: the generator and the :class:`~unitok.UniTok` whose codes it models
            (on one device).
        real_source, train_source: held-out and training data (``open_source(spec, 'val' / 'train')``),
            map-style with the generator's class labels.
        classnames: the generator's classes (default: ``real_source.classnames``).
        val_codes: a :class:`~unitok.generation.CodeDataset` of held-out codes for the NLL (default:
            the held-out images' codes from the tokenizer).
        process_group: every rank of it must call this; samples and images are sharded over it.
        samples_dir: where the samples files live (sampled first, then measured; files with the same
            header are reused); None: the samples stay in memory.
        generator_path: recorded in the samples files' headers.
    """
    cfg = cfg or GenEvalConfig()
    cfg.validate()
    classnames = list(classnames or getattr(real_source, 'classnames', None) or [])
    _check_inputs(generator, tokenizer, real_source, train_source, classnames)
    was = generator.training, tokenizer.training
    generator.eval()
    tokenizer.eval()
    try:
        start = time.time()
        sampler = Sampler(generator, cfg, samples_dir, generator_path, process_group, progress)
        for scale in cfg.cfg_scales if samples_dir is not None else ():
            sampler.codes(float(scale))           # stage 1: every scale's samples file, before any measure
        run = _Run.create(generator, tokenizer, cfg, classnames, real_source, progress, process_group)
        real, nll = _held_out(run, real_source, val_codes)
        train = _train_features(run, train_source)
        probe = LinearProbe(train[f'real_{run.first}'], train['label'], len(classnames), cfg.probe_l2,
                            cfg.probe_iters)
        sweep, grids = [], {}
        for scale in cfg.cfg_scales:
            gen, grid = _samples(run, float(scale), sampler.codes(float(scale)))
            if grid is not None:
                grids[float(scale)] = grid
            sweep.append(_scale_metrics(run, float(scale), real, gen, train, probe))
        metrics = _summary(run, real, train, probe, nll, sweep, val_codes is not None)
        metrics['seconds'] = time.time() - start
        return GenEvalResult(metrics=metrics, grids=grids, classnames=classnames)
    finally:
        generator.train(was[0])
        tokenizer.train(was[1])


@dataclass
class _Run:
    """What every stage of one evaluation shares."""
    generator: nn.Module
    tokenizer: nn.Module
    cfg: GenEvalConfig
    group: object
    rank: int
    world: int
    show: bool
    extractors: dict[str, nn.Module]
    zero_shot: torch.Tensor               # (E, C) classifier of the tokenizer's zero-shot head
    transform: object

    @classmethod
    def create(cls, generator, tokenizer, cfg, classnames, real_source, progress, group) -> '_Run':
        rank, world = D.rank_and_world(group)
        device = tokenizer.device
        extractors = {n: e.to(device) for n, e in build_extractors(
            cfg.extractors, {'inception': cfg.inception_weights, 'dinov2': cfg.dinov2_weights}).items()}
        templates = list(cfg.templates or getattr(real_source, 'templates', None) or ('a photo of a {}.',))
        return cls(generator, tokenizer, cfg, group, rank, world, progress and rank == 0, extractors,
                   tokenizer.zero_shot_classifier(classnames, templates),
                   eval_transform(cfg.image_size or tokenizer.config.image_size))

    @property
    def device(self) -> torch.device:
        return self.tokenizer.device

    @property
    def first(self) -> str:
        return self.cfg.extractors[0]

    def features(self, u8: torch.Tensor) -> dict[str, torch.Tensor]:
        return extract(self.extractors, u8.to(self.device))

    def zero_shot_pred(self, u8: torch.Tensor) -> torch.Tensor:
        """Tokenizer zero-shot classes of uint8 images, seen as the PNG would hold them."""
        emb = self.tokenizer.encode_image(u8.to(self.device).float().div(127.5).sub(1))
        return (emb @ self.zero_shot.to(emb.dtype)).argmax(1).cpu()


def _nll_sums(generator, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sub-codebook NLL sums and the sample count, float64 on the CPU (see :mod:`.metrics.nll`)."""
    _, m = generator.loss(codes, labels)
    return weighted_sums([m[f'nll_{k}'] for k in range(generator.config.num_codebooks)], codes.shape[0]).cpu()


def _held_out_pieces(run: _Run, source, indices: list[int], side: dict, nll: list):
    """Tokenizer passes over the held-out images on fixed chunks: ``(indices, uint8 images, uint8
    reconstructions)``; labels and zero-shot predictions go to ``side``, NLL sums to ``nll``."""
    K = run.generator.config.num_codebooks
    for idx, x, labels in read_images(source, indices, run.cfg.chunk_size, run.transform):
        u8 = to_uint8_tensor(x.to(run.device))
        codes, rec, img_feat = run.tokenizer.analyze(u8.float().div(127.5).sub(1))
        side['index'].append(idx)
        side['label'].append(labels)
        side['zero_shot'].append((img_feat @ run.zero_shot.to(img_feat.dtype)).argmax(1).cpu())
        if nll is not None:
            h, w = run.generator.config.grid
            nll.append(_nll_sums(run.generator, codes.view(codes.shape[0], K, h, w), labels.to(run.device)))
        yield idx, u8.cpu(), to_uint8_tensor(rec).cpu()


def _held_out(run: _Run, source, val_codes) -> tuple[dict, torch.Tensor]:
    """Features of the held-out images and reconstructions, labels, zero-shot predictions, NLL sums."""
    cfg = run.cfg
    mine = subset_indices(len(source), cfg.max_real, getattr(source, 'labels', None), cfg.seed)[run.rank::run.world]
    side: dict[str, list] = {'index': [], 'label': [], 'zero_shot': []}
    rows: dict[str, list] = {**{f'real_{n}': [] for n in run.extractors}, **{f'rec_{n}': [] for n in run.extractors}}
    index: list[torch.Tensor] = []
    nll_parts: list | None = [] if val_codes is None else None
    pieces = rebatch(_held_out_pieces(run, source, mine, side, nll_parts), cfg.batch_size)
    for idx, u8, u8_rec in progress_bar(pieces, 'held-out', -(-len(mine) // cfg.batch_size), run.show):
        index.append(idx)
        for prefix, images in (('real', u8), ('rec', u8_rec)):
            for n, f in run.features(images).items():
                rows[f'{prefix}_{n}'].append(f)
    side_index = side.pop('index')
    real = {**gather_rows(index, rows, run.group), **gather_rows(side_index, side, run.group)}
    nll = _val_codes_nll(run, val_codes) if val_codes is not None else \
        sum(nll_parts, torch.zeros(run.generator.config.num_codebooks + 1, dtype=torch.float64))
    D.all_reduce(nll, group=run.group)
    if real['label'].numel() <= cfg.pr_k:
        raise GenEvalError(f'{real["label"].numel()} held-out images: precision/recall with k={cfg.pr_k} needs more')
    return real, nll


def _val_codes_nll(run: _Run, val_codes) -> torch.Tensor:
    gc = run.generator.config
    val_codes.expect(gc.num_codebooks, gc.codebook_size, gc.grid, what='the generator')
    nll = torch.zeros(gc.num_codebooks + 1, dtype=torch.float64)
    mine = list(range(run.rank, len(val_codes), run.world))
    for s in range(0, len(mine), run.cfg.chunk_size):
        items = [val_codes[i] for i in mine[s:s + run.cfg.chunk_size]]
        codes = torch.stack([it['codes'] for it in items]).to(run.device)
        nll += _nll_sums(run.generator, codes, torch.tensor([it['label'] for it in items], device=run.device))
    return nll


def _train_features(run: _Run, source) -> dict:
    cfg = run.cfg
    mine = subset_indices(len(source), cfg.max_train, getattr(source, 'labels', None), cfg.seed)[run.rank::run.world]
    rows: dict[str, list] = {'label': [], **{f'real_{n}': [] for n in run.extractors}}
    index = []
    for idx, x, labels in progress_bar(read_images(source, mine, cfg.batch_size, run.transform), 'train',
                                       -(-len(mine) // cfg.batch_size), run.show):
        index.append(idx)
        rows['label'].append(labels)
        for n, f in run.features(to_uint8_tensor(x.to(run.device))).items():
            rows[f'real_{n}'].append(f)
    return gather_rows(index, rows, run.group)


def _decoded(run: _Run, codes: torch.Tensor, side: dict):
    """Decoding of the sampled ``codes (N, K, h, w)`` on this rank's fixed chunks: ``(indices, uint8
    samples)``; zero-shot predictions go to ``side``."""
    cfg = run.cfg
    plan = sample_chunks(run.generator.config.num_classes, cfg.samples_per_class, cfg.chunk_size, cfg.seed)
    for lo, hi, _ in plan[run.rank::run.world]:
        u8 = to_uint8_tensor(run.tokenizer.decode(codes[lo:hi].to(run.device)))
        side['index'].append(torch.arange(lo, hi))
        side['zero_shot'].append(run.zero_shot_pred(u8))
        yield torch.arange(lo, hi), u8.cpu()


def _samples(run: _Run, scale: float, codes: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """Stage 2 for one scale: features and zero-shot predictions of its samples ``codes`` (gathered, in
    sample order) and the report's grid ``(C, g, 3, H, W)`` in [-1, 1] (``None`` without grid samples)."""
    cfg = run.cfg
    C = run.generator.config.num_classes
    side: dict[str, list] = {'index': [], 'zero_shot': []}
    rows: dict[str, list] = {n: [] for n in run.extractors}
    index, grid_index, grid_rows = [], [], []
    steps = -(-C * cfg.samples_per_class // max(run.world, 1) // cfg.batch_size) + 1
    for idx, u8 in progress_bar(rebatch(_decoded(run, codes, side), cfg.batch_size), f'samples cfg {scale:g}',
                                steps, run.show):
        index.append(idx)
        for n, f in run.features(u8).items():
            rows[n].append(f)
        keep = (idx % cfg.samples_per_class) < cfg.grid_samples
        if keep.any():
            grid_index.append(idx[keep])
            grid_rows.append(u8[keep])
    side_index = side.pop('index')
    gen = {**gather_rows(index, rows, run.group), **gather_rows(side_index, side, run.group)}
    if not cfg.grid_samples:
        return gen, None
    g = gather_rows(grid_index, {'grid': grid_rows}, run.group)['grid']
    per = min(cfg.grid_samples, cfg.samples_per_class)
    return gen, g.view(C, per, *g.shape[1:]).float().div(127.5).sub(1)


def _scale_metrics(run: _Run, scale: float, real: dict, gen: dict, train: dict, probe: LinearProbe) -> dict:
    cfg, first = run.cfg, run.first
    requested = torch.arange(run.generator.config.num_classes * cfg.samples_per_class) // cfg.samples_per_class
    m: dict = {'cfg_scale': scale}
    for n in run.extractors:
        m.update(_distribution(real[f'real_{n}'], gen[n], n, cfg))
    m['consistency_zero_shot'], m['control_zero_shot'] = consistency(gen['zero_shot'], requested, cfg.seed)
    m['consistency_classifier'], m['control_classifier'] = consistency(probe.predict(gen[first]), requested, cfg.seed)
    m.update(copy_statistics(gen[first], train[f'real_{first}'], real[f'real_{first}'], cfg.copy_percentile))
    log.info('cfg %g: %s', scale, ', '.join(f'{k} {v:.4g}' for k, v in m.items() if k != 'cfg_scale'))
    return m


def _summary(run: _Run, real: dict, train: dict, probe: LinearProbe, nll: torch.Tensor, sweep: list,
             exported_codes: bool) -> dict:
    """report.json's numbers: the sweep, floors, ceilings and held-out NLL."""
    cfg, first = run.cfg, run.first
    C, K = run.generator.config.num_classes, run.generator.config.num_codebooks
    per_scale = C * cfg.samples_per_class
    floor_idx = subset_indices(train['label'].numel(), per_scale, train['label'].tolist(), cfg.seed)
    rvr: dict = {'samples': len(floor_idx)}
    rec: dict = {'samples': int(real['label'].numel())}
    for n in run.extractors:
        rvr.update(_distribution(real[f'real_{n}'], train[f'real_{n}'][floor_idx], n, cfg))
        rec.update(_distribution(real[f'real_{n}'], real[f'rec_{n}'], n, cfg))
    held_first = real[f'real_{first}']
    rvr.update(copy_statistics(train[f'real_{first}'][floor_idx], train[f'real_{first}'], held_first,
                               cfg.copy_percentile))
    nll_out = codebook_nll(nll, K)
    nll_out.update(samples=int(nll[K]), source='exported held-out codes' if exported_codes
                   else 'held-out images encoded by the tokenizer')
    return {
        'classes': C, 'chance': 1.0 / C, 'samples_per_class': cfg.samples_per_class, 'samples_per_scale': per_scale,
        'held_out_images': int(real['label'].numel()), 'train_images': int(train['label'].numel()),
        'primary_extractor': first,
        'sweep': sweep,
        'floors': {'real_vs_real': rvr, 'reconstruction_vs_real': rec},
        'ceilings': {'zero_shot_held_out_accuracy': _accuracy(real['zero_shot'], real['label']),
                     'classifier_held_out_accuracy': _accuracy(probe.predict(held_first), real['label']),
                     'classifier_train_accuracy': _accuracy(probe.predict(train[f'real_{first}']), train['label'])},
        'held_out_nll': nll_out,
    }


def _accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float((predicted == truth).double().mean())


def run_generator_evaluation(gen_path: str, data: str, out_dir: str, cfg: GenEvalConfig | None = None,
                             tokenizer_path: str | None = None, codes_val: str | None = None,
                             device: str | torch.device = 'cpu', progress: bool = False) -> dict:
    """Load, evaluate on ``data``'s 'val' (held-out) and 'train' splits, write ``report.json`` and
    ``report.html`` to ``out_dir`` (rank 0), the samples files to ``out_dir/samples``; returns the
    report on every rank."""
    from ..data import has_split, open_source
    cfg = cfg or GenEvalConfig()
    cfg.validate()
    if not has_split(data, 'val') or not has_split(data, 'train'):
        raise GenEvalError(f'data {data!r} has no distinct train and val splits: the floors and the copy rate need '
                           'held-out images apart from the training images (builtin:NAME, or a folder with '
                           'train/ and val/)')
    generator, tokenizer, info = load_generator(gen_path, tokenizer_path, device)
    real, train = open_source(data, 'val', resampled=False), open_source(data, 'train', resampled=False)
    val_codes = None
    if codes_val:
        from ..codes import CodeDataset
        val_codes = CodeDataset(codes_val, view=0, label=info.get('label_set'))
        val_codes.check_tokenizer(tokenizer)
    classnames = info.get('classnames') or getattr(real, 'classnames', None)
    result = evaluate_generator(generator, tokenizer, real, train, cfg, classnames=classnames, val_codes=val_codes,
                                progress=progress, samples_dir=os.path.join(out_dir, 'samples'),
                                generator_path=gen_path)
    result.metrics['meta'] = {
        'generator': gen_path, 'tokenizer': tokenizer_path or info.get('tokenizer'), 'data': data,
        'codes_val': codes_val, 'generator_config': generator.config.to_dict(),
        'protocol': {**dataclasses.asdict(cfg), 'real_split': 'val', 'train_split': 'train',
                     'images': 'samples decoded by the tokenizer, features of uint8 images'},
        'processes': D.rank_and_world()[1], 'device': str(device),
        'versions': {'torch': torch.__version__, 'python': platform.python_version()},
    }
    if D.rank_and_world()[0] == 0:
        write_generation_report(out_dir, result)
    return result.metrics
