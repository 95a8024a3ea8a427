"""One pass over an evaluation set: reconstruction metrics, Fréchet distances of reconstructions,
zero-shot accuracy, the in-batch CLIP loss, retrieval and codebook health -- the same numbers
whatever the batch size or the number of processes (except ``clip_loss``, see below).

Protocol (fixed, recorded in the report): each image is converted to RGB (alpha on white); with
``resize='crop'`` its shorter side is resized to the model size (bicubic, antialiased) and the centre
square cropped; with ``resize='native'`` it keeps its size, centre-cropped down to multiples of 16.
Reconstructions are clamped to [-1, 1]; PSNR and SSIM use the [0, 1] scale, ``l1`` the model's
[-1, 1] scale (that of the training L1 loss); feature extractors see both images as uint8, i.e.
exactly what PNG files of them would hold.

Subsets (``max_samples``): a fixed sample, the same for any batch size and process count. For a
source with random access and labels it is class-balanced: the samples are put in a seeded random
order (``EvalConfig.seed``), then taken in turn from each class (the first of every class, then the
second, ...), so N samples cover min(N, classes) classes; its accuracy estimates the class-mean
accuracy (equal to the full set's when classes are equally large or equally hard). Without labels it
is a seeded random sample. For streamed shards it is the first samples of every shard in turn (at
most ``max_samples``). ``metrics['samples']`` and ``metrics['classes_covered']`` say what was covered.

``clip_loss`` is the symmetric in-batch CLIP cross-entropy at the model's logit scale, averaged per
sample over batches of ``batch_size`` samples of one process: it depends on the batch composition
(larger batches: more negatives, a larger loss), so compare it only at one batch size and process
count. Every other statistic is a sum over samples (float64 or integer) reduced once at the end, and
every per-sample computation is independent of the other samples in its batch.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data import eval_transform
from ..images import ImageReadError, to_uint8_tensor
from ..losses.contrastive import ContrastiveLoss
from ..losses.perceptual import LPIPSPerceptual
from ..utils import distributed as D
from .codebook import CodebookStats
from .features import build_extractor
from .fid import FrechetDistance, inception_score, kernel_inception_distance
from .reconstruction import l1, psnr, ssim
from .zero_shot import retrieval_recall, topk_correct

log = logging.getLogger(__name__)

ALL_METRICS = ('rfid', 'psnr', 'ssim', 'lpips', 'l1', 'zero_shot', 'clip_loss', 'retrieval', 'codebook', 'is', 'kid')
DEFAULT_METRICS = ('rfid', 'psnr', 'ssim', 'zero_shot', 'retrieval', 'codebook')
# Cheap enough for validation during training: no feature extractor, no all-pairs retrieval.
TRAINING_METRICS = ('psnr', 'l1', 'zero_shot', 'clip_loss')
MAX_SKIPPED_LISTED = 20       # names of unreadable samples kept in EvalResult.skipped (all are counted)

# positions in the float64 sums vector
_N, _PSNR, _SSIM, _LPIPS, _L1, _CLIP, _TOP1, _TOP5, _LABELLED, _SKIPPED, _SUMS = range(11)


@dataclass
class EvalConfig:
    metrics: tuple[str, ...] = DEFAULT_METRICS      # from ALL_METRICS; TRAINING_METRICS for validation
    extractors: tuple[str, ...] = ('effnet-lite0',)   # feature extractors for rfid / kid
    inception_weights: str | None = None
    dinov2_weights: str | None = None
    lpips_weights: str | None = None
    batch_size: int = 32                  # per process; changes only clip_loss
    resize: str = 'crop'                 # 'crop' (model size) | 'native'
    image_size: int | None = None        # default: the model's
    max_samples: int | None = None       # a fixed class-balanced subset of this size (module docstring)
    seed: int = 0                        # order from which the max_samples subset is drawn
    templates: tuple[str, ...] | None = None   # zero-shot prompt templates with {}; default: the source's
    grid_samples: int = 8                # originals / reconstructions kept for the report (rank 0)

    def validate(self) -> None:
        if isinstance(self.metrics, str) or isinstance(self.extractors, str):
            raise TypeError('EvalConfig.metrics and .extractors are sequences of names, e.g. metrics=("psnr",)')
        unknown = sorted(set(self.metrics) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f'unknown metric(s) {unknown}; choose from {ALL_METRICS}')
        if self.resize not in ('crop', 'native'):
            raise ValueError(f"EvalConfig.resize must be 'crop' or 'native', got {self.resize!r}")
        for name in ('batch_size', 'max_samples', 'image_size'):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f'EvalConfig.{name} must be a positive integer, got {value!r}')
        if isinstance(self.grid_samples, bool) or not isinstance(self.grid_samples, int) or self.grid_samples < 0:
            raise ValueError(f'EvalConfig.grid_samples must be an integer >= 0, got {self.grid_samples!r}')
        for t in self.templates or ():
            if not isinstance(t, str) or '{}' not in t:
                raise ValueError(f'zero-shot template {t!r} has no {{}} for the class name '
                                 '(every class would get the same prompt)')
        if 'lpips' in self.metrics and not self.lpips_weights:
            raise ValueError("metric 'lpips' needs LPIPS-VGG weights in a local file: pass --lpips-weights PATH "
                             "(EvalConfig.lpips_weights) with torchvision's vgg16-397923af.pth or the official "
                             "lpips_with_vgg.pth, or leave lpips out of the metrics")
        if 'lpips' in self.metrics and not os.path.isfile(self.lpips_weights):
            raise FileNotFoundError(f'--lpips-weights (EvalConfig.lpips_weights): no file at {self.lpips_weights!r}')


@dataclass
class EvalResult:
    metrics: dict[str, float]                                   # numbers only (int for counts): loggable as is
    grid: list[torch.Tensor] = field(default_factory=list)     # [originals, reconstructions] (n, 3, H, W)
    codebook_counts: torch.Tensor | None = None                 # (K, n) int64
    per_codebook: list[dict] = field(default_factory=list)      # usage, perplexity, ... of each sub-codebook
    skipped: list[str] = field(default_factory=list)            # first MAX_SKIPPED_LISTED 'name: error'
    subset: str = ''                                            # which samples were evaluated, in words


def subset_indices(size: int, limit: int | None, labels: Sequence[int] | None = None, seed: int = 0) -> list[int]:
    """Indices (ascending) of the samples evaluated out of ``size``: all without a ``limit``; else the
    class-balanced sample of the module docstring (a seeded random sample without ``labels``)."""
    if limit is None or limit >= size:
        return list(range(size))
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    if labels is None:
        return sorted(order[:limit])
    turn: dict[int, int] = defaultdict(int)     # samples of each class taken so far
    class_rank: dict[int, int] = {}             # classes in the order of their first sample
    keyed = []
    for i in order:
        label = int(labels[i])
        class_rank.setdefault(label, len(class_rank))
        keyed.append((turn[label], class_rank[label], i))
        turn[label] += 1
    keyed.sort()
    return sorted(i for _, _, i in keyed[:limit])


def _native_crop(image, multiple=16):
    w, h = image.size
    W, H = w - w % multiple, h - h % multiple
    if W == 0 or H == 0:
        raise ImageReadError(f'image of {w}x{h} pixels is smaller than {multiple}x{multiple}')
    left, top = (w - W) // 2, (h - H) // 2
    return image.crop((left, top, left + W, top + H))


def _first_caption(caption):
    return caption[0] if isinstance(caption, (list, tuple)) else caption


def _samples(source, rank: int, world: int, cfg: EvalConfig):
    """(key, image, caption, label) of this rank's share of the subset, or (key, exception) for
    unreadable ones."""
    if hasattr(source, 'read'):
        labels = getattr(source, 'labels', None)
        chosen = subset_indices(len(source), cfg.max_samples, labels, cfg.seed)
        for i in chosen[rank::world]:
            try:
                image, caption, label = source.read(i)
                yield source.key(i), image, _first_caption(caption), label
            except (OSError, ValueError) as e:          # ImageReadError is an OSError
                yield source.key(i), e
        return
    yield from _stream_samples(source, rank, world, cfg.max_samples)


def _stream_samples(source, rank: int, world: int, limit: int | None):
    """Streamed shards: this rank's shards; with a limit, sample j of shard s is kept when
    ``j * shards + s < limit`` (the first samples of every shard in turn, whoever reads the shard)."""
    urls = list(getattr(source, 'urls', ()))
    index = {u: s for s, u in enumerate(urls)}
    quota = {u: len(range(index[u], limit, len(urls))) for u in urls[rank::world]} if limit and urls else None
    seen: dict[str, int] = defaultdict(int)
    for raw in source.iter_once(rank, world):
        if quota is not None:
            url = raw.get('__url__')
            if url not in quota:
                continue
            seen[url] += 1
            if seen[url] > quota[url]:
                if all(seen[u] >= q for u, q in quota.items()):
                    return
                continue
        try:
            image, caption, label = source.decode(raw)
            yield source.key(raw), image, _first_caption(caption), label
        except (OSError, ValueError) as e:
            yield source.key(raw), e


def _batches(samples, size: int, transform):
    """Batches of same-sized tensors; unreadable samples are passed through as (key, error)."""
    batch, shape = [], None
    for item in samples:
        if len(item) == 2:
            yield 'error', item
            continue
        key, image, caption, label = item
        try:
            x = transform(image)
        except (OSError, ValueError) as e:
            yield 'error', (key, e)
            continue
        if batch and (x.shape != shape or len(batch) == size):
            yield 'batch', batch
            batch = []
        batch.append((key, x, caption, label))
        shape = x.shape
    if batch:
        yield 'batch', batch


def _describe_subset(source, cfg: EvalConfig) -> str:
    total = len(source) if hasattr(source, 'read') else None
    if cfg.max_samples is None or (total is not None and cfg.max_samples >= total):
        return 'all samples' if total is None else f'all {total} samples'
    if total is None:
        return f'at most {cfg.max_samples} samples: the first of every shard in turn'
    kind = 'class-balanced' if getattr(source, 'labels', None) is not None and getattr(source, 'classnames', None) \
        else 'random'
    return f'{kind} sample of {cfg.max_samples} of {total} (seed {cfg.seed})'


@torch.no_grad()
def evaluate(model, source, cfg: EvalConfig | None = None, progress: bool = False,
             process_group=None) -> EvalResult:
    """Evaluate ``model`` (a :class:`~unitok.UniTok`, not a DDP/FSDP wrapper) on a data source (see
    :func:`unitok.data.open_source`). Returns plain numbers in ``result.metrics``.

    The samples are sharded over the ranks of ``process_group`` and the statistics merged over it:
    every rank of the group must call this (``None``: the default group when one is initialised,
    else this process alone). The model's train/eval mode is restored on return.
    """
    cfg = cfg or EvalConfig()
    cfg.validate()
    rank, world = D.rank_and_world(process_group)
    sync = D.initialized() and world > 1
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, source, cfg, progress, process_group, rank, world, sync)
    finally:
        model.train(was_training)


def _evaluate(model, source, cfg, progress, group, rank, world, sync) -> EvalResult:
    device = model.device
    # float64 sums on the GPU (no host sync per batch; NCCL reduces device tensors only)
    acc = device if device.type == 'cuda' else torch.device('cpu')
    metrics = set(cfg.metrics)
    size = cfg.image_size or model.config.image_size
    if cfg.resize == 'crop':
        transform = eval_transform(size)
    else:
        from torchvision.transforms.functional import to_tensor

        def transform(image):
            return to_tensor(_native_crop(image)).mul(2).sub(1)

    extractors = {}
    if metrics & {'rfid', 'kid', 'is'}:
        names = list(cfg.extractors) + (['inception'] if 'is' in metrics and 'inception' not in cfg.extractors else [])
        for name in names:
            weights = {'inception': cfg.inception_weights, 'dinov2': cfg.dinov2_weights}.get(name)
            extractors[name] = build_extractor(name, weights).to(device)
    # Features of the originals feed rFID and KID only; the Inception Score reads reconstructions.
    frechet = {name: FrechetDistance(e.dim, sync_on_compute=sync, process_group=group).to(acc)
               for name, e in extractors.items() if name in cfg.extractors} if 'rfid' in metrics else {}
    kept_features = {name: ([], []) for name in cfg.extractors} if 'kid' in metrics else {}
    logits_is = []
    lpips = LPIPSPerceptual(cfg.lpips_weights).to(device) if 'lpips' in metrics else None   # LPIPS-VGG
    clip_loss = ContrastiveLoss() if 'clip_loss' in metrics else None        # in-batch: one process, no gather

    classnames = getattr(source, 'classnames', None)
    classifier = None
    if 'zero_shot' in metrics and classnames:
        templates = list(cfg.templates or getattr(source, 'templates', ('a photo of a {}.',)))
        classifier = model.zero_shot_classifier(classnames, templates)
    codebook = CodebookStats.for_quantizer(model.quantizer, sync_on_compute=sync,
                                           process_group=group).to(acc) if 'codebook' in metrics else None

    sums = torch.zeros(_SUMS, dtype=torch.float64, device=acc)
    label_counts = torch.zeros(len(classnames) if classnames else 0, dtype=torch.float64, device=acc)
    image_feats, captions, sample_keys, skipped, grid = [], [], [], [], [[], []]
    start = time.time()
    iterator = _batches(_samples(source, rank, world, cfg), cfg.batch_size, transform)
    if progress and rank == 0:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc='eval', unit='batch')
    for kind, payload in iterator:
        if kind == 'error':
            key, error = payload
            sums[_SKIPPED] += 1
            if len(skipped) < MAX_SKIPPED_LISTED:
                skipped.append(f'{key}: {error}'[:300])
            continue
        keys, xs, caps, labels = zip(*payload)
        x = torch.stack(xs).to(device)
        codes, rec, img_feat = model.analyze(x)
        sums[_N] += len(keys)
        if 'kid' in metrics or 'is' in metrics:
            sample_keys += list(keys)
        if 'psnr' in metrics:
            sums[_PSNR] += psnr(rec, x).sum().to(acc)
        if 'ssim' in metrics:
            sums[_SSIM] += ssim(rec, x).sum().to(acc)
        if 'l1' in metrics:
            sums[_L1] += l1(rec, x).sum().to(acc)
        if lpips is not None:
            sums[_LPIPS] += lpips.per_image(x, rec).double().sum().to(acc)
        if clip_loss is not None:
            text_feat = model.encode_text(list(caps))
            sums[_CLIP] += clip_loss(img_feat, text_feat, model.logit_scale.exp()).double().to(acc) * len(keys)
        if extractors:
            u8_real, u8_rec = to_uint8_tensor(x), to_uint8_tensor(rec)
            for name, extractor in extractors.items():
                f_rec, logits = extractor(u8_rec)
                if name in frechet or name in kept_features:
                    f_real, _ = extractor(u8_real)
                if name in frechet:
                    frechet[name].update(f_real.to(acc), real=True)
                    frechet[name].update(f_rec.to(acc), real=False)
                if name in kept_features:
                    kept_features[name][0].append(f_real.cpu())
                    kept_features[name][1].append(f_rec.cpu())
                if name == 'inception' and 'is' in metrics:
                    logits_is.append(logits.cpu())
        lab = torch.tensor(labels, device=acc)
        if label_counts.numel():
            known = lab[lab >= 0]
            label_counts += torch.bincount(known, minlength=label_counts.numel()).double()
        if classifier is not None:
            counts = topk_correct(img_feat @ classifier, lab.to(device))
            sums[_TOP1] += counts[1]
            sums[_TOP5] += counts[5]
            sums[_LABELLED] += int((lab >= 0).sum())
        if 'retrieval' in metrics:
            image_feats.append(img_feat.cpu())
            captions += list(caps)
        if codebook is not None:
            codebook.update(codes.to(acc))
        if len(grid[0]) < cfg.grid_samples and rank == 0:
            take = cfg.grid_samples - len(grid[0])
            grid[0] += list(x[:take].cpu())
            grid[1] += list(rec[:take].cpu())

    # ---------------------------------------------------------------- reduce over ranks
    reduced = D.all_reduce(torch.cat([sums, label_counts]), group=group).cpu()       # one collective
    sums, label_counts = reduced[:_SUMS], reduced[_SUMS:]
    skipped = sorted(_gather_list(skipped, group))[:MAX_SKIPPED_LISTED]
    n, n_skipped = int(sums[_N]), int(sums[_SKIPPED])
    if n == 0:
        raise ValueError(f'no readable images to evaluate ({n_skipped} skipped, e.g. {skipped[:3]})')
    if n_skipped:
        log.warning('%d unreadable image(s) skipped, e.g. %s', n_skipped, skipped[0])
    out: dict = {'samples': n, 'skipped': n_skipped}
    if label_counts.numel():
        out['classes_covered'] = int((label_counts > 0).sum())
    for name, key in (('psnr', _PSNR), ('ssim', _SSIM), ('l1', _L1), ('lpips', _LPIPS), ('clip_loss', _CLIP)):
        if name in metrics:
            out[name] = float(sums[key]) / n
    if frechet and n < 2:
        raise ValueError(f'rfid needs at least 2 readable images, got {n}')
    for name, fd in frechet.items():
        out[f'rfid_{name}'] = float(fd.compute())
    if kept_features or logits_is:
        # Sample-order-dependent metrics (KID subsets, IS splits) use one canonical order: sorted keys.
        all_keys = _gather_list(sample_keys, group)
        order = torch.tensor(sorted(range(len(all_keys)), key=all_keys.__getitem__), dtype=torch.long)
        for name, (real, fake) in kept_features.items():
            real_all, fake_all = _gather_cat(real, group)[order], _gather_cat(fake, group)[order]
            out[f'kid_{name}'], out[f'kid_{name}_std'] = kernel_inception_distance(real_all, fake_all)
        if logits_is:
            out['inception_score'], out['inception_score_std'] = inception_score(_gather_cat(logits_is, group)[order])
    if classifier is not None and sums[_LABELLED] > 0:
        count = float(sums[_LABELLED])
        out['zero_shot_top1'] = float(sums[_TOP1]) / count
        out['zero_shot_top5'] = float(sums[_TOP5]) / count
        out['zero_shot_classes'] = len(classnames)
        out['zero_shot_samples'] = int(count)
    if 'retrieval' in metrics:
        feats = _gather_cat(image_feats, group)
        caps_all = _gather_list(captions, group)
        # Each distinct caption is encoded once (class-folder data repeats one caption per class).
        unique = sorted(set(caps_all))
        unique_feats = torch.cat([model.encode_text(unique[s:s + 256]).cpu() for s in range(0, len(unique), 256)])
        row = {c: i for i, c in enumerate(unique)}
        out.update(retrieval_recall(feats, unique_feats[[row[c] for c in caps_all]], caps_all))
    counts, per_codebook = None, []
    if codebook is not None:
        summary = codebook.compute()
        counts, per_codebook = summary.pop('counts'), summary.pop('per_codebook')
        out.update(summary)
    out['seconds'] = time.time() - start
    grid_tensors = [torch.stack(g) for g in grid] if grid[0] else []
    return EvalResult(metrics=out, grid=grid_tensors, codebook_counts=counts, per_codebook=per_codebook,
                      skipped=skipped, subset=_describe_subset(source, cfg))


def _gather_cat(parts: list[torch.Tensor], group=None) -> torch.Tensor:
    """This rank's tensors, concatenated with every other rank's (in rank order)."""
    gathered = D.all_gather_object(torch.cat(parts) if parts else torch.zeros(0), group=group)
    return torch.cat([g for g in gathered if g.numel()] or [torch.zeros(0)])


def _gather_list(items: list, group=None) -> list:
    return [x for part in D.all_gather_object(items, group=group) for x in part]
