"""One pass over an evaluation set: reconstruction metrics, Fréchet distances of reconstructions,
zero-shot accuracy, retrieval and codebook health -- the same numbers whatever the batch size or
the number of processes.

Protocol (fixed, recorded in the report): each image is converted to RGB (alpha on white); with
``resize='crop'`` its shorter side is resized to the model size (bicubic, antialiased) and the centre
square cropped; with ``resize='native'`` it keeps its size, centre-cropped down to multiples of 16.
Reconstructions are clamped to [-1, 1]; PSNR and SSIM use the [0, 1] scale; feature extractors see
both images as uint8, i.e. exactly what PNG files of them would hold.

Every statistic is a sum over samples (float64 or integer) reduced once at the end, and every
per-sample computation is independent of the other samples in its batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..data import eval_transform
from ..images import ImageReadError
from ..losses.perceptual import LPIPSPerceptual
from ..utils import distributed as D
from .codebook import CodebookStats
from .features import build_extractor
from .fid import FeatureStats, frechet_distance, inception_score, kernel_inception_distance
from .reconstruction import psnr, ssim
from .zero_shot import retrieval_recall, topk_correct

ALL_METRICS = ('rfid', 'psnr', 'ssim', 'lpips', 'zero_shot', 'retrieval', 'codebook', 'is', 'kid')
DEFAULT_METRICS = ('rfid', 'psnr', 'ssim', 'zero_shot', 'retrieval', 'codebook')


@dataclass
class EvalConfig:
    metrics: tuple[str, ...] = DEFAULT_METRICS
    extractors: tuple[str, ...] = ('effnet-lite0',)   # feature extractors for rfid / kid
    inception_weights: str | None = None
    dinov2_weights: str | None = None
    lpips_weights: str | None = None
    batch_size: int = 32
    resize: str = 'crop'                 # 'crop' (model size) | 'native'
    image_size: int | None = None        # default: the model's
    max_samples: int | None = None
    templates: tuple[str, ...] | None = None   # zero-shot prompt templates; default: the source's
    grid_samples: int = 8

    def validate(self) -> None:
        unknown = sorted(set(self.metrics) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f'unknown metric(s) {unknown}; choose from {ALL_METRICS}')
        if self.resize not in ('crop', 'native'):
            raise ValueError(f"resize must be 'crop' or 'native', got {self.resize!r}")
        if self.batch_size < 1:
            raise ValueError('batch_size must be >= 1')


@dataclass
class EvalResult:
    metrics: dict
    grid: list[torch.Tensor] = field(default_factory=list)     # [originals, reconstructions] (n, 3, H, W)
    codebook_counts: torch.Tensor | None = None                 # (K, n)
    skipped: list[str] = field(default_factory=list)


def _native_crop(image, multiple=16):
    w, h = image.size
    W, H = w - w % multiple, h - h % multiple
    if W == 0 or H == 0:
        raise ImageReadError(f'image of {w}x{h} pixels is smaller than {multiple}x{multiple}')
    left, top = (w - W) // 2, (h - H) // 2
    return image.crop((left, top, left + W, top + H))


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def _samples(source, rank: int, world: int, limit: int | None):
    """(key, image, caption, label) of this rank's share, or (key, exception) for unreadable ones."""
    if hasattr(source, 'read'):
        n = len(source) if limit is None else min(limit, len(source))
        for i in range(rank, n, world):
            try:
                image, caption, label = source.read(i)
                if isinstance(caption, (list, tuple)):
                    caption = caption[0]
                yield source.key(i), image, caption, label
            except (ImageReadError, OSError, ValueError) as e:
                yield source.key(i), e
        return
    count = 0
    for raw in source.iter_once(rank, world):
        if limit is not None and count >= limit:   # per rank for streamed shards
            return
        count += 1
        try:
            image, caption, label = source.decode(raw)
            yield source.key(raw), image, caption, label
        except (ImageReadError, OSError, ValueError) as e:
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
        except (OSError, ValueError, ImageReadError) as e:
            yield 'error', (key, e)
            continue
        if batch and (x.shape != shape or len(batch) == size):
            yield 'batch', batch
            batch = []
        batch.append((key, x, caption, label))
        shape = x.shape
    if batch:
        yield 'batch', batch


@torch.no_grad()
def evaluate(model, source, cfg: EvalConfig | None = None, progress: bool = False) -> EvalResult:
    """Evaluate ``model`` (a :class:`~unitok.UniTok`) on a data source (see :func:`unitok.data.open_source`)."""
    cfg = cfg or EvalConfig()
    cfg.validate()
    rank, world = D.rank_and_world()
    device = model.device
    model.eval()
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
    stats = {name: (FeatureStats(e.dim, device), FeatureStats(e.dim, device))
             for name, e in extractors.items()} if 'rfid' in metrics else {}
    kept_features = {name: ([], []) for name in extractors} if 'kid' in metrics else {}
    logits_is = []
    lpips = LPIPSPerceptual(cfg.lpips_weights).to(device) if 'lpips' in metrics else None   # LPIPS-VGG

    classifier, classnames = None, getattr(source, 'classnames', None)
    if 'zero_shot' in metrics and classnames:
        templates = list(cfg.templates or getattr(source, 'templates', ('a photo of a {}.',)))
        classifier = model.zero_shot_classifier(classnames, templates)
    codebook = CodebookStats(model.config.num_codebooks, model.config.codebook_size) if 'codebook' in metrics else None

    sums = torch.zeros(7, dtype=torch.float64)     # n, psnr, ssim, lpips, top1, top5, labelled
    image_feats, captions, sample_keys, skipped, grid = [], [], [], [], [[], []]
    start = time.time()
    iterator = _batches(_samples(source, rank, world, cfg.max_samples), cfg.batch_size, transform)
    if progress and rank == 0:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc='eval', unit='batch')
    for kind, payload in iterator:
        if kind == 'error':
            key, error = payload
            skipped.append(f'{key}: {error}'[:300])
            continue
        keys, xs, caps, labels = zip(*payload)
        x = torch.stack(xs).to(device)
        codes, rec, img_feat = model.analyze(x)
        sums[0] += len(keys)
        sample_keys += list(keys)
        if 'psnr' in metrics:
            sums[1] += psnr(rec, x).sum().cpu()
        if 'ssim' in metrics:
            sums[2] += ssim(rec, x).sum().cpu()
        if lpips is not None:
            sums[3] += lpips.per_image(x, rec).double().sum().cpu()
        if extractors:
            u8_real, u8_rec = _to_u8(x), _to_u8(rec)
            for name, extractor in extractors.items():
                f_rec, logits = extractor(u8_rec)
                if name in stats or name in kept_features:
                    f_real, _ = extractor(u8_real)
                if name in stats:
                    stats[name][0].update(f_real)
                    stats[name][1].update(f_rec)
                if name in kept_features:
                    kept_features[name][0].append(f_real.cpu())
                    kept_features[name][1].append(f_rec.cpu())
                if name == 'inception' and 'is' in metrics:
                    logits_is.append(logits.cpu())
        if classifier is not None:
            lab = torch.tensor(labels, device=device)
            counts = topk_correct(img_feat @ classifier, lab)
            sums[4] += counts[1]
            sums[5] += counts[5]
            sums[6] += int((lab >= 0).sum())
        if 'retrieval' in metrics:
            image_feats.append(img_feat.cpu())
            captions += list(caps)
        if codebook is not None:
            codebook.update(codes)
        if len(grid[0]) < cfg.grid_samples and rank == 0:
            take = cfg.grid_samples - len(grid[0])
            grid[0] += list(x[:take].cpu())
            grid[1] += list(rec[:take].cpu())

    # ---------------------------------------------------------------- reduce over ranks
    D.all_reduce(sums)
    skipped = _gather_list(skipped)
    # Sample-order-dependent metrics (KID subsets, IS splits) use one canonical order: sorted keys.
    all_keys = _gather_list(sample_keys)
    order = torch.tensor(sorted(range(len(all_keys)), key=all_keys.__getitem__), dtype=torch.long)
    n = int(sums[0].item())
    if n == 0:
        raise ValueError(f'no readable images to evaluate ({len(skipped)} skipped)')
    out: dict = {'samples': n, 'skipped': len(skipped)}
    if 'psnr' in metrics:
        out['psnr'] = sums[1].item() / n
    if 'ssim' in metrics:
        out['ssim'] = sums[2].item() / n
    if lpips is not None:
        out['lpips'] = sums[3].item() / n
    for name, (real, fake) in stats.items():
        real.all_reduce()
        fake.all_reduce()
        out[f'rfid_{name}'] = frechet_distance(*real.mean_cov(), *fake.mean_cov())
    for name, (real, fake) in kept_features.items():
        real_all, fake_all = _gather_cat(real)[order], _gather_cat(fake)[order]
        out[f'kid_{name}'], out[f'kid_{name}_std'] = kernel_inception_distance(real_all, fake_all)
    if logits_is:
        out['inception_score'], out['inception_score_std'] = inception_score(_gather_cat(logits_is)[order])
    if classifier is not None:
        count = max(1.0, sums[6].item())
        out['zero_shot_top1'] = sums[4].item() / count
        out['zero_shot_top5'] = sums[5].item() / count
        out['zero_shot_classes'] = len(classnames)
    if 'retrieval' in metrics:
        feats = _gather_cat(image_feats)
        caps_all = _gather_list(captions)
        # Each distinct caption is encoded once (class-folder data repeats one caption per class).
        unique = sorted(set(caps_all))
        unique_feats = torch.cat([model.encode_text(unique[s:s + 256]).cpu() for s in range(0, len(unique), 256)])
        row = {c: i for i, c in enumerate(unique)}
        out.update(retrieval_recall(feats, unique_feats[[row[c] for c in caps_all]], caps_all))
    counts = None
    if codebook is not None:
        codebook.all_reduce()
        out.update(codebook.summary())
        counts = codebook.counts
    out['seconds'] = time.time() - start
    grid_tensors = [torch.stack(g) for g in grid] if grid[0] else []
    return EvalResult(metrics=out, grid=grid_tensors, codebook_counts=counts, skipped=skipped)


def _gather_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """This rank's tensors, concatenated with every other rank's (in rank order)."""
    gathered = D.all_gather_object(torch.cat(parts) if parts else torch.zeros(0))
    return torch.cat([g for g in gathered if g.numel()] or [torch.zeros(0)])


def _gather_list(items: list) -> list:
    return [x for part in D.all_gather_object(items) for x in part]
