"""Tokenizer evaluation: one pass over an evaluation set measuring reconstructions (PSNR, SSIM, L1,
LPIPS, Fréchet distances, KID, Inception Score), zero-shot accuracy, the in-batch CLIP loss,
retrieval and codebook health, the same whatever the batch size or the number of processes.

Protocol (recorded in the report): images converted to RGB; ``resize='crop'``: shorter side resized
to the model size (bicubic, antialiased) and the centre square cropped; ``resize='native'``: centre-
cropped down to multiples of 16. Reconstructions are clamped to [-1, 1]; extractors see uint8 images
(what PNG files hold). ``max_samples`` picks a fixed subset (:func:`~unitok.eval.subsets.subset_indices`).
``clip_loss`` depends on the batch composition; every other statistic is a sum over samples reduced
once at the end.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from ..data import eval_transform
from ..images import to_uint8_tensor
from ..losses.contrastive import ContrastiveLoss
from ..losses.perceptual import LPIPSPerceptual
from ..pretrained import is_hub_id
from ..utils import distributed as D
from .features import build_extractors
from .subsets import describe_subset, image_batches, native_crop, source_samples, subset_indices
from .metrics import (CodebookStats, FrechetDistance, inception_score, kernel_inception_distance, l1, psnr,
                      retrieval_recall, ssim, topk_correct)

log = logging.getLogger(__name__)

ALL_METRICS = ('rfid', 'psnr', 'ssim', 'lpips', 'l1', 'zero_shot', 'clip_loss', 'retrieval', 'codebook', 'is', 'kid')
DEFAULT_METRICS = ('rfid', 'psnr', 'ssim', 'zero_shot', 'retrieval', 'codebook')
# Cheap enough for validation during training: no feature extractor, no all-pairs retrieval.
TRAINING_METRICS = ('psnr', 'l1', 'zero_shot', 'clip_loss')
MAX_SKIPPED_LISTED = 20       # names of unreadable samples kept in EvalResult.skipped (all are counted)

# positions in the float64 sums vector
_N, _PSNR, _SSIM, _LPIPS, _L1, _CLIP, _TOP1, _TOP5, _LABELLED, _SKIPPED, _SUMS = range(11)
_MEANS = (('psnr', _PSNR), ('ssim', _SSIM), ('l1', _L1), ('lpips', _LPIPS), ('clip_loss', _CLIP))

__all__ = ['ALL_METRICS', 'DEFAULT_METRICS', 'TRAINING_METRICS', 'EvalConfig', 'EvalResult', 'evaluate',
           'subset_indices']


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
    max_samples: int | None = None       # a fixed class-balanced subset of this size (see subset_indices)
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
        if 'lpips' in self.metrics and not (os.path.exists(self.lpips_weights) or is_hub_id(self.lpips_weights)):
            raise FileNotFoundError(f'--lpips-weights (EvalConfig.lpips_weights): no file or folder at '
                                    f'{self.lpips_weights!r}, and not a hub id (owner/name)')


@dataclass
class EvalResult:
    metrics: dict[str, float]                                   # numbers only (int for counts): loggable as is
    grid: list[torch.Tensor] = field(default_factory=list)     # [originals, reconstructions] (n, 3, H, W)
    codebook_counts: torch.Tensor | None = None                 # (K, n) int64
    per_codebook: list[dict] = field(default_factory=list)      # usage, perplexity, ... of each sub-codebook
    skipped: list[str] = field(default_factory=list)            # first MAX_SKIPPED_LISTED 'name: error'
    subset: str = ''                                            # which samples were evaluated, in words


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
    was_training = model.training
    model.eval()
    try:
        meters = TokenizerMeters(model, source, cfg, process_group)
        start = time.time()
        for kind, payload in _progress(image_batches(source_samples(source, rank, world, cfg), cfg.batch_size,
                                                     _transform(model, cfg)), progress and rank == 0):
            if kind == 'error':
                meters.skip(*payload)
            else:
                meters.update(payload, keep_grid=rank == 0)
        result = meters.compute()
        result.metrics['seconds'] = time.time() - start
        result.subset = describe_subset(source, cfg)
        return result
    finally:
        model.train(was_training)


def _transform(model, cfg: EvalConfig):
    if cfg.resize == 'crop':
        return eval_transform(cfg.image_size or model.config.image_size)
    return _native_tensor


def _native_tensor(image) -> torch.Tensor:
    from torchvision.transforms.functional import to_tensor
    return to_tensor(native_crop(image)).mul(2).sub(1)


def _progress(iterator, show: bool):
    if not show:
        return iterator
    from tqdm.auto import tqdm
    return tqdm(iterator, desc='eval', unit='batch')


class TokenizerMeters:
    """What one evaluation accumulates: float64 sums, feature metrics, codebook counts and the rows
    that need every sample (retrieval, KID, IS), merged over ``group`` in :meth:`compute`."""

    def __init__(self, model, source, cfg: EvalConfig, group=None):
        self.model, self.cfg, self.group = model, cfg, group
        self.metrics = set(cfg.metrics)
        world = D.rank_and_world(group)[1]
        sync = D.initialized() and world > 1
        device = model.device
        # float64 sums on the GPU (no host sync per batch; NCCL reduces device tensors only)
        self.acc = device if device.type == 'cuda' else torch.device('cpu')
        names = list(cfg.extractors) if self.metrics & {'rfid', 'kid', 'is'} else []
        if 'is' in self.metrics and 'inception' not in names:
            names.append('inception')
        self.extractors = {n: e.to(device) for n, e in build_extractors(
            names, {'inception': cfg.inception_weights, 'dinov2': cfg.dinov2_weights}).items()}
        # Features of the originals feed rFID and KID only; the Inception Score reads reconstructions.
        self.frechet = {n: FrechetDistance(e.dim, sync_on_compute=sync, process_group=group).to(self.acc)
                        for n, e in self.extractors.items() if n in cfg.extractors} if 'rfid' in self.metrics else {}
        self.kept_features = {n: ([], []) for n in cfg.extractors} if 'kid' in self.metrics else {}
        self.logits_is: list[torch.Tensor] = []
        self.lpips = LPIPSPerceptual(cfg.lpips_weights).to(device) if 'lpips' in self.metrics else None
        self.clip_loss = ContrastiveLoss() if 'clip_loss' in self.metrics else None   # in-batch: no gather
        self.classnames = getattr(source, 'classnames', None)
        self.classifier = None
        if 'zero_shot' in self.metrics and self.classnames:
            templates = list(cfg.templates or getattr(source, 'templates', ('a photo of a {}.',)))
            self.classifier = model.zero_shot_classifier(self.classnames, templates)
        self.codebook = None
        if 'codebook' in self.metrics:
            self.codebook = CodebookStats.for_quantizer(model.quantizer, sync_on_compute=sync,
                                                        process_group=group).to(self.acc)
        self.sums = torch.zeros(_SUMS, dtype=torch.float64, device=self.acc)
        self.label_counts = torch.zeros(len(self.classnames) if self.classnames else 0, dtype=torch.float64,
                                        device=self.acc)
        self.image_feats, self.captions, self.sample_keys, self.skipped = [], [], [], []
        self.grid: list[list[torch.Tensor]] = [[], []]

    def skip(self, key, error) -> None:
        self.sums[_SKIPPED] += 1
        if len(self.skipped) < MAX_SKIPPED_LISTED:
            self.skipped.append(f'{key}: {error}'[:300])

    def update(self, batch: list, keep_grid: bool = True) -> None:
        """One batch of ``(key, image (3, H, W), caption, label)``."""
        keys, xs, caps, labels = zip(*batch)
        x = torch.stack(xs).to(self.model.device)
        codes, rec, img_feat = self.model.analyze(x)
        self.sums[_N] += len(keys)
        if 'kid' in self.metrics or 'is' in self.metrics:
            self.sample_keys += list(keys)
        self._update_pixels(x, rec, img_feat, caps)
        if self.extractors:
            self._update_features(to_uint8_tensor(x), to_uint8_tensor(rec))
        self._update_labels(torch.tensor(labels, device=self.acc), img_feat)
        if 'retrieval' in self.metrics:
            self.image_feats.append(img_feat.cpu())
            self.captions += list(caps)
        if self.codebook is not None:
            self.codebook.update(codes.to(self.acc))
        if len(self.grid[0]) < self.cfg.grid_samples and keep_grid:
            take = self.cfg.grid_samples - len(self.grid[0])
            self.grid[0] += list(x[:take].cpu())
            self.grid[1] += list(rec[:take].cpu())

    def _update_pixels(self, x, rec, img_feat, caps) -> None:
        for name, key, fn in (('psnr', _PSNR, psnr), ('ssim', _SSIM, ssim), ('l1', _L1, l1)):
            if name in self.metrics:
                self.sums[key] += fn(rec, x).sum().to(self.acc)
        if self.lpips is not None:
            self.sums[_LPIPS] += self.lpips.per_image(x, rec).double().sum().to(self.acc)
        if self.clip_loss is not None:
            text_feat = self.model.encode_text(list(caps))
            self.sums[_CLIP] += self.clip_loss(img_feat, text_feat, self.model.logit_scale.exp()).double().to(
                self.acc) * len(caps)

    def _update_features(self, u8_real, u8_rec) -> None:
        for name, extractor in self.extractors.items():
            f_rec, logits = extractor(u8_rec)
            if name in self.frechet or name in self.kept_features:
                f_real, _ = extractor(u8_real)
            if name in self.frechet:
                self.frechet[name].update(f_real.to(self.acc), real=True)
                self.frechet[name].update(f_rec.to(self.acc), real=False)
            if name in self.kept_features:
                self.kept_features[name][0].append(f_real.cpu())
                self.kept_features[name][1].append(f_rec.cpu())
            if name == 'inception' and 'is' in self.metrics:
                self.logits_is.append(logits.cpu())

    def _update_labels(self, lab, img_feat) -> None:
        if self.label_counts.numel():
            known = lab[lab >= 0]
            self.label_counts += torch.bincount(known, minlength=self.label_counts.numel()).double()
        if self.classifier is not None:
            counts = topk_correct(img_feat @ self.classifier, lab.to(self.model.device))
            self.sums[_TOP1] += counts[1]
            self.sums[_TOP5] += counts[5]
            self.sums[_LABELLED] += int((lab >= 0).sum())

    def compute(self) -> EvalResult:
        """Merge over the group (collectives) and return the result (``seconds`` and ``subset`` unset)."""
        reduced = D.all_reduce(torch.cat([self.sums, self.label_counts]), group=self.group).cpu()  # one collective
        sums, label_counts = reduced[:_SUMS], reduced[_SUMS:]
        skipped = sorted(_gather_list(self.skipped, self.group))[:MAX_SKIPPED_LISTED]
        n, n_skipped = int(sums[_N]), int(sums[_SKIPPED])
        if n == 0:
            raise ValueError(f'no readable images to evaluate ({n_skipped} skipped, e.g. {skipped[:3]})')
        if n_skipped:
            log.warning('%d unreadable image(s) skipped, e.g. %s', n_skipped, skipped[0])
        out: dict = {'samples': n, 'skipped': n_skipped}
        if label_counts.numel():
            out['classes_covered'] = int((label_counts > 0).sum())
        out.update({name: float(sums[key]) / n for name, key in _MEANS if name in self.metrics})
        if self.frechet and n < 2:
            raise ValueError(f'rfid needs at least 2 readable images, got {n}')
        for name, fd in self.frechet.items():
            out[f'rfid_{name}'] = float(fd.compute())
        out.update(self._ordered_metrics())
        if self.classifier is not None and sums[_LABELLED] > 0:
            count = float(sums[_LABELLED])
            out.update(zero_shot_top1=float(sums[_TOP1]) / count, zero_shot_top5=float(sums[_TOP5]) / count,
                       zero_shot_classes=len(self.classnames), zero_shot_samples=int(count))
        if 'retrieval' in self.metrics:
            out.update(self._retrieval())
        counts, per_codebook = None, []
        if self.codebook is not None:
            summary = self.codebook.compute()
            counts, per_codebook = summary.pop('counts'), summary.pop('per_codebook')
            out.update(summary)
        grid = [torch.stack(g) for g in self.grid] if self.grid[0] else []
        return EvalResult(metrics=out, grid=grid, codebook_counts=counts, per_codebook=per_codebook, skipped=skipped)

    def _ordered_metrics(self) -> dict:
        """KID and the Inception Score over every rank's samples in one canonical order: sorted keys."""
        out: dict = {}
        if not (self.kept_features or self.logits_is):
            return out
        all_keys = _gather_list(self.sample_keys, self.group)
        order = torch.tensor(sorted(range(len(all_keys)), key=all_keys.__getitem__), dtype=torch.long)
        for name, (real, fake) in self.kept_features.items():
            real_all, fake_all = _gather_cat(real, self.group)[order], _gather_cat(fake, self.group)[order]
            out[f'kid_{name}'], out[f'kid_{name}_std'] = kernel_inception_distance(real_all, fake_all)
        if self.logits_is:
            out['inception_score'], out['inception_score_std'] = inception_score(
                _gather_cat(self.logits_is, self.group)[order])
        return out

    def _retrieval(self) -> dict:
        feats = _gather_cat(self.image_feats, self.group)
        caps_all = _gather_list(self.captions, self.group)
        # Each distinct caption is encoded once (class-folder data repeats one caption per class).
        unique = sorted(set(caps_all))
        unique_feats = torch.cat([self.model.encode_text(unique[s:s + 256]).cpu() for s in range(0, len(unique), 256)])
        row = {c: i for i, c in enumerate(unique)}
        return retrieval_recall(feats, unique_feats[[row[c] for c in caps_all]], caps_all)


def _gather_cat(parts: list[torch.Tensor], group=None) -> torch.Tensor:
    """This rank's tensors, concatenated with every other rank's (in rank order)."""
    gathered = D.all_gather_object(torch.cat(parts) if parts else torch.zeros(0), group=group)
    return torch.cat([g for g in gathered if g.numel()] or [torch.zeros(0)])


def _gather_list(items: list, group=None) -> list:
    return [x for part in D.all_gather_object(items, group=group) for x in part]
