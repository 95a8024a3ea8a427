"""Evaluation of a class-conditional generator over UniTok codes (``unitok eval-gen``).

What is measured, at every guidance scale of a sweep (samples decoded by the tokenizer, seen as uint8
images, i.e. exactly what PNG files of them hold):

* ``fd_{extractor}``: Fréchet distance of the samples' features against the held-out real images'
  (float64 statistics, :class:`~unitok.eval.fid.FrechetDistance`). Only ``fd_inception`` is an FID;
  ``effnet-lite0`` and ``dinov2`` distances are Fréchet distances in those feature spaces.
* ``kid_{extractor}`` and its interval: KID (unbiased MMD^2, cubic kernel) over ``kid_subsets``
  random subsets drawn without replacement, each of ``min(kid_subset_size, half the smaller set)``
  samples (half, so that the subsets differ even when a set is small); ``kid_*`` is their mean,
  ``kid_*_low`` / ``kid_*_high`` the 2.5 / 97.5 percentiles (a subsampling interval: wider than
  the full-set estimate's own uncertainty, never narrower).
* ``precision_*`` / ``recall_*``: improved precision and recall (Kynkäänniemi et al., 2019) with
  k-nearest-neighbour balls, ``k = pr_k`` (3).
* ``consistency_zero_shot``: the share of samples that the tokenizer's zero-shot head (class names
  through the data source's prompt templates) assigns to the requested class;
  ``consistency_classifier``: the same for a logistic-regression probe on the first extractor's
  features, trained on the train split (its held-out real accuracy is reported as its ceiling).
  ``control_*``: the same predictions scored against a seeded random permutation of the requested
  labels, which should sit near chance (``1 / classes``).
* ``copy_rate``: the share of samples whose nearest training image (cosine distance, first
  extractor) is at least as close as the 1st percentile (``copy_percentile``) of the held-out real
  images' nearest-training-image distances -- closer to the training set than 99% of new real
  images are. ``nn_distance_ratio``: mean nearest-training-image distance of the samples over that of
  the held-out real images (about 1: as novel as new real images; near 0: copies).

Beside them: the floors ``real_vs_real`` (a class-balanced train-split subset as large as one
scale's samples, against held-out) and ``reconstruction_vs_real`` (the tokenizer's reconstructions of
the held-out images against the images), the zero-shot accuracy of the held-out real images, and the
held-out negative log-likelihood per sub-codebook (nats; exported held-out codes, or the held-out
images' codes from the tokenizer).

Reproducibility. Samples are planned, not drawn from a running RNG: sample ``s`` has class
``s // samples_per_class``; the samples are cut into chunks of ``chunk_size`` consecutive indices and
chunk ``i`` is one :func:`~unitok.generation.generate` call seeded with ``mix_seed(seed, i)`` (the same
seeds at every guidance scale, so the sweep compares scales on common random numbers). ``generate``
draws from one generator per call, so the chunking decides the samples. Every generator and
tokenizer pass (sampling, decoding, encoding the held-out images) runs on those fixed chunks, so that
no code and no pixel depends on ``batch_size`` (a different batch composition can round a matrix
product differently, flip a near-tie of the code search or a pixel's uint8 value, and the Fréchet
distance of a few hundred samples in 1280 dimensions amplifies such noise); ``batch_size`` batches
only the feature extractors, whose outputs are per-sample. Under several processes, chunk ``i`` goes
to rank ``i % world``; every statistic is computed once over the gathered features in sample order,
in float64. Changing ``chunk_size`` or the device changes the samples (equally valid ones).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from ..data import eval_transform, mix_seed
from ..images import to_uint8_tensor
from ..utils import distributed as D
from .evaluator import subset_indices
from .features import EXTRACTORS, build_extractor
from .fid import FrechetDistance, kernel_inception_distance

log = logging.getLogger(__name__)


class GenEvalError(ValueError):
    """The generator, tokenizer and data cannot be evaluated together (named in the message)."""


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
        def positive(name, allow_none=False):
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GenEvalError(f'GenEvalConfig.{name} must be a positive integer, got {v!r}')

        for name in ('samples_per_class', 'chunk_size', 'batch_size', 'pr_k', 'kid_subsets', 'kid_subset_size',
                     'probe_iters'):
            positive(name)
        for name in ('max_real', 'max_train', 'image_size'):
            positive(name, allow_none=True)
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


# ---------------------------------------------------------------------- metrics on features
def _pairwise_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(len(a), len(b))`` in float64 (clamped at 0)."""
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def _kth_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance of every row of ``x`` to its k-th nearest other row."""
    out = []
    for s in range(0, x.shape[0], chunk):
        d = _pairwise_sq(x[s:s + chunk], x)
        # the row itself is at distance 0 and comes first: the k-th other neighbour is entry k
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _covered(query: torch.Tensor, ref: torch.Tensor, radius: torch.Tensor, chunk: int) -> torch.Tensor:
    """Whether each query row lies in at least one ball (ref_j, radius_j)."""
    out = []
    for s in range(0, query.shape[0], chunk):
        out.append((_pairwise_sq(query[s:s + chunk], ref) <= radius[None, :]).any(1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) of feature sets ``(N, D)``.

    Each set's manifold is the union of balls around its samples reaching their k-th nearest
    neighbour in the set. Precision: share of ``fake`` samples inside the real manifold; recall: share
    of ``real`` samples inside the fake manifold. Float64 distances.

    Ours, not a library's: torchmetrics has no generative precision/recall, and torch-fidelity's
    (a test-only dependency here) works on its own extraction pipeline rather than on given features.
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f'precision_recall takes feature sets (N, D) of one D, got {tuple(real.shape)} '
                         f'and {tuple(fake.shape)}')
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f'precision_recall with k={k} needs more than {k} samples per set, '
                         f'got {real.shape[0]} real and {fake.shape[0]} generated')
    r, f = real.double(), fake.double()
    precision = _covered(f, r, _kth_radius(r, k, chunk), chunk).double().mean()
    recall = _covered(r, f, _kth_radius(f, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def kid_interval(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                 seed: int = 0) -> dict[str, float]:
    """KID over ``subsets`` random subsets (see the module docstring): mean, std, 2.5/97.5 percentiles."""
    m = max(2, min(subset_size, min(real.shape[0], fake.shape[0]) // 2))
    values = torch.tensor([kernel_inception_distance(real, fake, subsets=1, subset_size=m,
                                                     seed=mix_seed(seed, i))[0] for i in range(subsets)],
                          dtype=torch.float64)
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {'mean': float(values.mean()), 'std': float(values.std(unbiased=False)), 'low': low, 'high': high,
            'subset_size': m}


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of two feature sets ``(N, D)`` (float64 statistics)."""
    fd = FrechetDistance(real.shape[1])
    fd.update(real, real=True)
    fd.update(fake, real=False)
    return float(fd.compute())


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, name: str, cfg: GenEvalConfig) -> dict[str, float]:
    """``fd_``, ``kid_`` (+ ``_std``, ``_low``, ``_high``), ``precision_``, ``recall_`` keys for one extractor."""
    kid = kid_interval(real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    precision, recall = precision_recall(real, fake, cfg.pr_k)
    return {f'fd_{name}': frechet_distance(real, fake), f'kid_{name}': kid['mean'], f'kid_{name}_std': kid['std'],
            f'kid_{name}_low': kid['low'], f'kid_{name}_high': kid['high'],
            f'precision_{name}': precision, f'recall_{name}': recall}


def nearest_distances(query: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Cosine distance ``1 - cos`` of every query row to its nearest reference row, float64 ``(N,)``."""
    q = torch.nn.functional.normalize(query.double(), dim=1)
    r = torch.nn.functional.normalize(reference.double(), dim=1)
    return torch.cat([(1 - q[s:s + chunk] @ r.T).amin(1) for s in range(0, q.shape[0], chunk)]).clamp_min(0)


def copy_statistics(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor,
                    percentile: float = 1.0) -> dict[str, float]:
    """Memorisation of ``samples`` against ``train`` features, calibrated on ``held_out`` real ones.

    Returns ``copy_rate`` (share of samples with a nearest-training-image distance <= the
    ``percentile``-th percentile of the held-out images' ones), ``copy_threshold`` and
    ``nn_distance_ratio`` (mean sample distance / mean held-out distance).
    """
    d_samples, d_held = nearest_distances(samples, train), nearest_distances(held_out, train)
    threshold = float(torch.quantile(d_held, percentile / 100))
    mean_held = float(d_held.mean())
    return {'copy_rate': float((d_samples <= threshold).double().mean()), 'copy_threshold': threshold,
            'nn_distance_ratio': float(d_samples.mean()) / mean_held if mean_held > 0 else float('inf')}


class LinearProbe:
    """Multinomial logistic regression on standardised features, fitted by L-BFGS in float64.

    Deterministic (zero initialisation, full-batch, no random draws), so it needs no seed.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-3,
                 iters: int = 200):
        x = features.double()
        labels = torch.as_tensor(labels, dtype=torch.long)
        if x.dim() != 2 or labels.shape != (x.shape[0],):
            raise ValueError(f'LinearProbe takes features (N, D) and labels (N,), got {tuple(x.shape)} and '
                             f'{tuple(labels.shape)}')
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f'LinearProbe labels must lie in [0, {num_classes})')
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-12)
        z = (x - self.mean) / self.std
        self.weight = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.weight, self.bias], lr=1, max_iter=iters, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn='strong_wolfe')

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ self.weight + self.bias, labels) \
                + l2 * self.weight.pow(2).sum()
            loss.backward()
            return loss
        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = self.weight.detach(), self.bias.detach()

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted classes ``(N,)`` int64."""
        return (((features.double() - self.mean) / self.std) @ self.weight + self.bias).argmax(1)


def consistency(predicted: torch.Tensor, requested: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """``(share of predictions equal to the requested class, the same against a seeded random
    permutation of the requested labels)``; the second is the shuffled-label control (~chance)."""
    predicted, requested = predicted.long().cpu(), requested.long().cpu()
    perm = torch.randperm(requested.numel(), generator=torch.Generator().manual_seed(seed))
    return (float((predicted == requested).double().mean()), float((predicted == requested[perm]).double().mean()))


# ---------------------------------------------------------------------- sample plan
def sample_chunks(num_classes: int, per_class: int, chunk: int, seed: int) -> list[tuple[int, int, int]]:
    """The plan of the module docstring: ``(first sample, end, seed)`` of every chunk."""
    total = num_classes * per_class
    return [(s, min(s + chunk, total), mix_seed(seed, i)) for i, s in enumerate(range(0, total, chunk))]


def _rebatch(pieces: Iterable[tuple[torch.Tensor, ...]], size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Pieces ``(indices, tensor, ...)`` of any length -> pieces of exactly ``size`` rows (the last may be smaller)."""
    held: list[tuple[torch.Tensor, ...]] = []
    count = 0
    for piece in pieces:
        held.append(piece)
        count += len(piece[0])
        while count >= size:
            cat = tuple(torch.cat(parts) for parts in zip(*held))
            yield tuple(t[:size] for t in cat)
            held, count = [tuple(t[size:] for t in cat)], count - size
    if count:
        yield tuple(torch.cat(parts) for parts in zip(*held))


def _gather_rows(index: list[torch.Tensor], rows: dict[str, list[torch.Tensor]], group) -> dict[str, torch.Tensor]:
    """Rows of every rank, in ascending sample index."""
    local = {'index': torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
             **{k: torch.cat(v) if v else torch.zeros(0) for k, v in rows.items()}}
    parts = D.all_gather_object(local, group=group)
    idx = torch.cat([p['index'] for p in parts])
    order = idx.argsort()
    return {k: torch.cat([p[k] for p in parts if p[k].numel()])[order] if idx.numel() else torch.zeros(0)
            for k in local if k != 'index'}


# ---------------------------------------------------------------------- the evaluation
def _real_indices(source, limit: int | None, seed: int) -> list[int]:
    return subset_indices(len(source), limit, getattr(source, 'labels', None), seed)


def _check_inputs(generator, tokenizer, real_source, train_source, classnames):
    gc, tc = generator.config, tokenizer.config
    if gc.cond != 'class':
        raise GenEvalError('eval-gen evaluates class-conditional generators; this one is text-conditional')
    if (tc.num_codebooks, tc.codebook_size) != (gc.num_codebooks, gc.codebook_size):
        raise GenEvalError(f'the tokenizer has {tc.num_codebooks} x {tc.codebook_size} codes, the generator models '
                           f'{gc.num_codebooks} x {gc.codebook_size}: not the tokenizer of its codes')
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
                       process_group=None) -> GenEvalResult:
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
    """
    cfg = cfg or GenEvalConfig()
    cfg.validate()
    classnames = list(classnames or getattr(real_source, 'classnames', None) or [])
    _check_inputs(generator, tokenizer, real_source, train_source, classnames)
    was = generator.training, tokenizer.training
    generator.eval()
    tokenizer.eval()
    try:
        return _evaluate(generator, tokenizer, real_source, train_source, cfg, classnames, val_codes, progress,
                         process_group)
    finally:
        generator.train(was[0])
        tokenizer.train(was[1])


def progress_bar(iterable, desc, total, show):
    """``iterable`` with a tqdm bar (``desc``, ``total`` steps) when ``show``, else as it is."""
    if not show:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total)


def _evaluate(generator, tokenizer, real_source, train_source, cfg, classnames, val_codes, progress, group):
    from ..generation import generate
    start = time.time()
    rank, world = D.rank_and_world(group)
    show = progress and rank == 0
    device = tokenizer.device
    C, K = len(classnames), generator.config.num_codebooks
    size = cfg.image_size or tokenizer.config.image_size
    transform = eval_transform(size)
    extractors = {n: build_extractor(n, {'inception': cfg.inception_weights, 'dinov2': cfg.dinov2_weights}.get(n))
                  .to(device) for n in cfg.extractors}
    first = cfg.extractors[0]
    templates = list(cfg.templates or getattr(real_source, 'templates', None) or ('a photo of a {}.',))
    zero_shot = tokenizer.zero_shot_classifier(classnames, templates)                # (E, C)

    def features(u8: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: e(u8)[0].double().cpu() for n, e in extractors.items()}

    def tokenizer_view(u8: torch.Tensor) -> torch.Tensor:
        return u8.to(device).float().div(127.5).sub(1)                               # what the PNG holds, [-1, 1]

    def read_images(source, indices, size):
        for s in range(0, len(indices), size):
            chunk = indices[s:s + size]
            xs, labels = [], []
            for i in chunk:
                image, _, label = source.read(i)
                xs.append(transform(image))
                labels.append(label)
            yield torch.tensor(chunk), torch.stack(xs), torch.tensor(labels)

    # ------------------------------------------------------------ held-out real images
    held = _real_indices(real_source, cfg.max_real, cfg.seed)
    side: dict[str, list] = {'label': [], 'zero_shot': []}
    rows: dict[str, list] = {**{f'real_{n}': [] for n in extractors}, **{f'rec_{n}': [] for n in extractors}}
    side_index: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    nll = torch.zeros(K + 1, dtype=torch.float64)
    mine = held[rank::world]

    def held_out_pieces():                      # tokenizer passes on fixed chunks (module docstring)
        for idx, x, labels in read_images(real_source, mine, cfg.chunk_size):
            u8 = to_uint8_tensor(x.to(device))
            codes, rec, img_feat = tokenizer.analyze(tokenizer_view(u8))
            side_index.append(idx)
            side['label'].append(labels)
            side['zero_shot'].append((img_feat @ zero_shot.to(img_feat.dtype)).argmax(1).cpu())
            if val_codes is None:
                h, w = generator.config.grid
                nonlocal nll
                nll = nll + _nll_sums(generator, codes.view(codes.shape[0], K, h, w), labels.to(device), K)
            yield idx, u8.cpu(), to_uint8_tensor(rec).cpu()
    for idx, u8, u8_rec in progress_bar(_rebatch(held_out_pieces(), cfg.batch_size), 'held-out',
                                -(-len(mine) // cfg.batch_size), show):
        index.append(idx)
        for n, f in features(u8.to(device)).items():
            rows[f'real_{n}'].append(f)
        for n, f in features(u8_rec.to(device)).items():
            rows[f'rec_{n}'].append(f)
    real = {**_gather_rows(index, rows, group), **_gather_rows(side_index, side, group)}
    if val_codes is not None:
        val_codes.expect(K, generator.config.codebook_size, generator.config.grid, what='the generator')
        mine = list(range(rank, len(val_codes), world))
        for s in range(0, len(mine), cfg.chunk_size):
            items = [val_codes[i] for i in mine[s:s + cfg.chunk_size]]
            codes = torch.stack([it['codes'] for it in items]).to(device)
            nll += _nll_sums(generator, codes, torch.tensor([it['label'] for it in items], device=device), K)
    D.all_reduce(nll, group=group)
    if real['label'].numel() <= cfg.pr_k:
        raise GenEvalError(f'{real["label"].numel()} held-out images: precision/recall with k={cfg.pr_k} needs more')

    # ------------------------------------------------------------ training images
    train_idx = _real_indices(train_source, cfg.max_train, cfg.seed)
    trows: dict[str, list] = {'label': [], **{f'real_{n}': [] for n in extractors}}
    index = []
    mine = train_idx[rank::world]
    for idx, x, labels in progress_bar(read_images(train_source, mine, cfg.batch_size), 'train',
                                       -(-len(mine) // cfg.batch_size), show):
        index.append(idx)
        trows['label'].append(labels)
        for n, f in features(to_uint8_tensor(x.to(device))).items():
            trows[f'real_{n}'].append(f)
    train = _gather_rows(index, trows, group)
    probe = LinearProbe(train[f'real_{first}'], train['label'], C, cfg.probe_l2, cfg.probe_iters)

    # ------------------------------------------------------------ samples at every guidance scale
    per_scale = C * cfg.samples_per_class
    plan = sample_chunks(C, cfg.samples_per_class, cfg.chunk_size, cfg.seed)
    sweep, grids = [], {}
    held_first = real[f'real_{first}']
    for scale in cfg.cfg_scales:
        zs: list[torch.Tensor] = []
        zs_index: list[torch.Tensor] = []

        def decoded():                          # sampling, decoding and the zero-shot head on fixed chunks
            for lo, hi, seed in plan[rank::world]:
                labels = torch.arange(lo, hi, device=device) // cfg.samples_per_class
                codes = generate(generator, labels, cfg_scale=float(scale), temperature=cfg.temperature,
                                 top_k=cfg.top_k, top_p=cfg.top_p, generator=seed)
                u8 = to_uint8_tensor(tokenizer.decode(codes))
                emb = tokenizer.encode_image(tokenizer_view(u8))
                zs_index.append(torch.arange(lo, hi))
                zs.append((emb @ zero_shot.to(emb.dtype)).argmax(1).cpu())
                yield torch.arange(lo, hi), u8.cpu()
        srows: dict[str, list] = {'grid': [], **{n: [] for n in extractors}}
        index, grid_index = [], []
        steps = -(-per_scale // max(world, 1) // cfg.batch_size) + 1
        for idx, u8 in progress_bar(_rebatch(decoded(), cfg.batch_size), f'samples cfg {scale:g}', steps, show):
            index.append(idx)
            for n, f in features(u8.to(device)).items():
                srows[n].append(f)
            keep = (idx % cfg.samples_per_class) < cfg.grid_samples
            if keep.any():
                grid_index.append(idx[keep])
                srows['grid'].append(u8[keep])
        grid_rows = srows.pop('grid')
        gen = {**_gather_rows(index, srows, group), **_gather_rows(zs_index, {'zero_shot': zs}, group)}
        if cfg.grid_samples:
            g = _gather_rows(grid_index, {'grid': grid_rows}, group)['grid']
            per = min(cfg.grid_samples, cfg.samples_per_class)
            grids[float(scale)] = g.view(C, per, *g.shape[1:]).float().div(127.5).sub(1)
        requested = torch.arange(per_scale) // cfg.samples_per_class
        m: dict = {'cfg_scale': float(scale)}
        for n in extractors:
            m.update(distribution_metrics(real[f'real_{n}'], gen[n], n, cfg))
        m['consistency_zero_shot'], m['control_zero_shot'] = consistency(gen['zero_shot'], requested, cfg.seed)
        m['consistency_classifier'], m['control_classifier'] = consistency(probe.predict(gen[first]), requested,
                                                                           cfg.seed)
        m.update(copy_statistics(gen[first], train[f'real_{first}'], held_first, cfg.copy_percentile))
        sweep.append(m)
        log.info('cfg %g: %s', scale, ', '.join(f'{k} {v:.4g}' for k, v in m.items() if k != 'cfg_scale'))

    # ------------------------------------------------------------ floors, ceilings, NLL
    floor_idx = subset_indices(train['label'].numel(), per_scale, train['label'].tolist(), cfg.seed)
    rvr: dict = {'samples': len(floor_idx)}
    rec: dict = {'samples': int(real['label'].numel())}
    for n in extractors:
        rvr.update(distribution_metrics(real[f'real_{n}'], train[f'real_{n}'][floor_idx], n, cfg))
        rec.update(distribution_metrics(real[f'real_{n}'], real[f'rec_{n}'], n, cfg))
    rvr.update(copy_statistics(train[f'real_{first}'][floor_idx], train[f'real_{first}'], held_first,
                               cfg.copy_percentile))
    count = max(1.0, float(nll[K]))
    nll_out = {f'nll_{k}': float(nll[k]) / count for k in range(K)}
    nll_out.update(nll=sum(nll_out.values()) / K, samples=int(nll[K]),
                   source='exported held-out codes' if val_codes is not None else 'held-out images encoded by the tokenizer')
    train_acc = float((probe.predict(train[f'real_{first}']) == train['label']).double().mean())
    metrics = {
        'classes': C, 'chance': 1.0 / C, 'samples_per_class': cfg.samples_per_class, 'samples_per_scale': per_scale,
        'held_out_images': int(real['label'].numel()), 'train_images': int(train['label'].numel()),
        'primary_extractor': first,
        'sweep': sweep,
        'floors': {'real_vs_real': rvr, 'reconstruction_vs_real': rec},
        'ceilings': {'zero_shot_held_out_accuracy': float((real['zero_shot'] == real['label']).double().mean()),
                     'classifier_held_out_accuracy': float((probe.predict(held_first) == real['label']).double().mean()),
                     'classifier_train_accuracy': train_acc},
        'held_out_nll': nll_out,
        'seconds': time.time() - start,
    }
    return GenEvalResult(metrics=metrics, grids=grids, classnames=classnames)


def _nll_sums(generator, codes: torch.Tensor, labels: torch.Tensor, K: int) -> torch.Tensor:
    """Sums over samples of the per-sub-codebook NLL (K,) and the sample count, float64 on the CPU."""
    _, m = generator.loss(codes, labels)
    B = codes.shape[0]
    return torch.tensor([float(m[f'nll_{k}']) * B for k in range(K)] + [B], dtype=torch.float64)


# ---------------------------------------------------------------------- loading and the report
GEN_TEMPLATE = 'generation_report.html'
# key prefix -> (label, which way is better); the extractor name follows the prefix
_ROW_LABELS = {
    'fd_inception': ('FID (Inception-v3)', 'lower'),
    'fd_': ('Fréchet distance, {} features (not FID)', 'lower'),
    'kid_': ('KID, {} features (mean over subsets; [2.5%, 97.5%])', 'lower'),
    'precision_': ('precision, {} features (k-NN balls)', 'higher'),
    'recall_': ('recall, {} features (k-NN balls)', 'higher'),
    'consistency_zero_shot': ('condition consistency: tokenizer zero-shot head', 'higher'),
    'control_zero_shot': ('shuffled-label control: zero-shot head (~chance)', ''),
    'consistency_classifier': ('condition consistency: linear probe trained on the train split', 'higher'),
    'control_classifier': ('shuffled-label control: linear probe (~chance)', ''),
    'copy_rate': ('copy rate (NN closer than 99% of held-out images are)', 'lower'),
    'nn_distance_ratio': ('mean NN distance to train / that of held-out images', 'about 1'),
}


def _row_label(key: str) -> tuple[str, str]:
    if key in _ROW_LABELS:
        return _ROW_LABELS[key]
    for prefix in ('fd_', 'kid_', 'precision_', 'recall_'):
        if key.startswith(prefix):
            label, better = _ROW_LABELS[prefix]
            return label.format(key[len(prefix):]), better
    return key, ''


def load_generator(gen_path: str, tokenizer_path: str | None = None, device: str | torch.device = 'cpu'):
    """``(generator, tokenizer, generation info)`` from ``RUN/model`` (with its ``generation.json``);
    the tokenizer defaults to the one recorded there and must be the one whose codes it was trained on."""
    import json
    import os

    from ..checkpoint import CheckpointError
    from ..generation import GeneratorModel
    from ..generation.codes import tokenizer_identity
    from ..model import UniTok
    from ..train.tasks.generator import GENERATION_INFO
    generator = GeneratorModel.from_pretrained(gen_path, map_location=device)
    info_path = os.path.join(gen_path, GENERATION_INFO)
    info = {}
    if os.path.isfile(info_path):
        try:
            with open(info_path, encoding='utf-8') as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f'cannot read {info_path}: {e}') from None
    tokenizer_path = tokenizer_path or info.get('tokenizer')
    if not tokenizer_path:
        raise GenEvalError(f'no tokenizer: {info_path} names none; pass --tokenizer (the UniTok model whose codes '
                           'the generator was trained on)')
    tokenizer = UniTok.from_pretrained(tokenizer_path).to(device).eval()
    mine, theirs = tokenizer_identity(tokenizer), info.get('codes_tokenizer')
    if theirs and any(mine[k] is not None and theirs.get(k) != mine[k] for k in mine):
        raise CheckpointError(f'{tokenizer_path!r} is not the tokenizer whose codes {gen_path!r} was trained on')
    return generator, tokenizer, info


def run_generator_evaluation(gen_path: str, data: str, out_dir: str, cfg: GenEvalConfig | None = None,
                             tokenizer_path: str | None = None, codes_val: str | None = None,
                             device: str | torch.device = 'cpu', progress: bool = False) -> dict:
    """Load, evaluate on ``data``'s 'val' (held-out) and 'train' splits, write ``report.json`` and
    ``report.html`` to ``out_dir`` (rank 0); returns the report on every rank."""
    import platform

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
        from ..generation.codes import CodeDataset
        val_codes = CodeDataset(codes_val, view=0, label=info.get('label_set'))
        val_codes.check_tokenizer(tokenizer)
    classnames = info.get('classnames') or getattr(real, 'classnames', None)
    result = evaluate_generator(generator, tokenizer, real, train, cfg, classnames=classnames, val_codes=val_codes,
                                progress=progress)
    import dataclasses
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


def sweep_plot(metrics: dict):
    """A PIL image: the first extractor's Fréchet distance and the condition consistency against the
    guidance scale, with the floors and the chance level as dashed lines."""
    import io

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from PIL import Image
    sweep, first = metrics['sweep'], metrics['primary_extractor']
    scales = [m['cfg_scale'] for m in sweep]
    key = f'fd_{first}'
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(scales, [m[key] for m in sweep], 'o-', color='#3b6ea5', label='samples vs held-out')
    for name, style in (('real_vs_real', '#2a9d55'), ('reconstruction_vs_real', '#c0392b')):
        a.axhline(metrics['floors'][name][key], ls='--', color=style, label=name.replace('_', ' ') + ' floor')
    a.set_xlabel('guidance scale')
    a.set_ylabel(_row_label(key)[0], fontsize=8)
    a.legend(fontsize=7)
    for k, color in (('consistency_zero_shot', '#3b6ea5'), ('consistency_classifier', '#8e44ad'),
                     ('control_classifier', '#999999')):
        b.plot(scales, [m[k] for m in sweep], 'o-', color=color, label=k.replace('_', ' '))
    b.axhline(metrics['chance'], ls='--', color='#555555', label='chance')
    b.set_ylim(0, 1)
    b.set_xlabel('guidance scale')
    b.set_ylabel('share of samples', fontsize=8)
    b.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert('RGB')


def _metric_table(metrics: dict) -> str:
    import html

    from .report import format_value
    columns = {f'cfg {m["cfg_scale"]:g}': m for m in metrics['sweep']}
    columns.update({'real vs real (floor)': metrics['floors']['real_vs_real'],
                    'reconstruction vs real (floor)': metrics['floors']['reconstruction_vs_real']})
    keys = [k for k in metrics['sweep'][0] if k != 'cfg_scale' and not k.endswith(('_std', '_low', '_high'))
            and k != 'copy_threshold']
    head = ''.join(f'<th>{html.escape(c)}</th>' for c in columns)
    rows = []
    for k in keys:
        label, better = _row_label(k)
        cells = []
        for m in columns.values():
            if k not in m:
                cells.append('<td>&ndash;</td>')
                continue
            text = format_value(m[k])
            if f'{k}_low' in m:
                text += f'<br><span class="hint">[{format_value(m[k + "_low"])}, {format_value(m[k + "_high"])}]</span>'
            cells.append(f'<td>{text}</td>')
        hint = f' <span class="hint">({better} is better)</span>' if better and better != 'about 1' else \
            (' <span class="hint">(about 1: as novel as new real images)</span>' if better else '')
        rows.append(f'<tr><td class="key"><code>{html.escape(k)}</code><br>{html.escape(label)}{hint}</td>'
                    f'{"".join(cells)}</tr>')
    return f'<table><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def write_generation_report(out_dir: str, result: GenEvalResult) -> None:
    """Write ``report.json`` (``result.metrics``), ``report.html`` (tables, the guidance-sweep plot,
    per-class sample grids), ``sweep.png`` and ``samples_cfg{scale}.png``."""
    import html
    import json
    import os

    from ..images import make_grid
    from ..utils.io import atomic_write
    from .report import format_value, png_data_uri, render_template
    m = result.metrics
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, 'report.json'), lambda f: f.write(json.dumps(m, indent=2) + '\n'), mode='w',
                 what='report')
    plot = sweep_plot(m)
    atomic_write(os.path.join(out_dir, 'sweep.png'), lambda f: plot.save(f, format='PNG'), what='sweep plot')
    sections = [f'<h2>Guidance sweep</h2><img class="plot" alt="guidance sweep" src="{png_data_uri(plot)}">']
    for scale, grid in result.grids.items():
        image = make_grid(list(grid))
        atomic_write(os.path.join(out_dir, f'samples_cfg{scale:g}.png'), lambda f: image.save(f, format='PNG'),
                     what='sample grid')
        names = ''.join(f'<li>{html.escape(c)}</li>' for c in result.classnames)
        sections.append(f'<h2>Samples at guidance scale {scale:g} (one row per class)</h2>'
                        f'<div class="samples"><img class="grid" alt="samples at cfg {scale:g}" '
                        f'src="{png_data_uri(image)}"><ol class="classes">{names}</ol></div>')
    side = {**{f'ceiling: {k.replace("_", " ")}': v for k, v in m['ceilings'].items()},
            **{f'held-out NLL {k}': v for k, v in m['held_out_nll'].items()},
            'chance': m['chance'], 'copy threshold (cosine distance)': m['sweep'][0]['copy_threshold'],
            'samples per scale': m['samples_per_scale'], 'held-out images': m['held_out_images'],
            'train images': m['train_images']}
    side_html = '<table>' + ''.join(f'<tr><td class="key">{html.escape(k)}</td><td>{format_value(v)}</td></tr>'
                                    for k, v in side.items()) + '</table>'
    meta = m.get('meta', {})
    page = render_template(
        os.path.join(os.path.dirname(__file__), GEN_TEMPLATE), title=html.escape(f'unitok generator evaluation: {meta.get("generator", "generator")}'),
        data=html.escape(str(meta.get('data', ''))), protocol=html.escape(json.dumps(meta.get('protocol', {}))),
        table=_metric_table(m), side=side_html, figures='\n'.join(sections),
        meta=html.escape(json.dumps({k: v for k, v in meta.items() if k != 'protocol'}, indent=1)))
    atomic_write(os.path.join(out_dir, 'report.html'), lambda f: f.write(page), mode='w', what='report')
