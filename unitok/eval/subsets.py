"""Fixed evaluation subsets of a data source and reading their images and captions: the same samples
for any batch size and process count."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from ..images import ImageReadError


def subset_indices(size: int, limit: int | None, labels: Sequence[int] | None = None, seed: int = 0) -> list[int]:
    """Indices (ascending) of the samples evaluated out of ``size``: all without a ``limit``; without
    ``labels`` a seeded random sample; with them a class-balanced one: the samples in a seeded random
    order, taken in turn from each class (the first of every class, then the second, ...), so that
    ``limit`` samples cover ``min(limit, classes)`` classes."""
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


def native_crop(image, multiple=16):
    w, h = image.size
    W, H = w - w % multiple, h - h % multiple
    if W == 0 or H == 0:
        raise ImageReadError(f'image of {w}x{h} pixels is smaller than {multiple}x{multiple}')
    left, top = (w - W) // 2, (h - H) // 2
    return image.crop((left, top, left + W, top + H))


def first_caption(caption):
    return caption[0] if isinstance(caption, (list, tuple)) else caption


def source_samples(source, rank: int, world: int, cfg):
    """(key, image, caption, label) of this rank's share of the subset, or (key, exception) for
    unreadable ones."""
    if hasattr(source, 'read'):
        labels = getattr(source, 'labels', None)
        chosen = subset_indices(len(source), cfg.max_samples, labels, cfg.seed)
        for i in chosen[rank::world]:
            try:
                image, caption, label = source.read(i)
                yield source.key(i), image, first_caption(caption), label
            except (OSError, ValueError) as e:          # ImageReadError is an OSError
                yield source.key(i), e
        return
    yield from stream_samples(source, rank, world, cfg.max_samples)


def stream_samples(source, rank: int, world: int, limit: int | None):
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
            yield source.key(raw), image, first_caption(caption), label
        except (OSError, ValueError) as e:
            yield source.key(raw), e


def image_batches(samples, size: int, transform):
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


def describe_subset(source, cfg) -> str:
    total = len(source) if hasattr(source, 'read') else None
    if cfg.max_samples is None or (total is not None and cfg.max_samples >= total):
        return 'all samples' if total is None else f'all {total} samples'
    if total is None:
        return f'at most {cfg.max_samples} samples: the first of every shard in turn'
    kind = 'class-balanced' if getattr(source, 'labels', None) is not None and getattr(source, 'classnames', None) \
        else 'random'
    return f'{kind} sample of {cfg.max_samples} of {total} (seed {cfg.seed})'


def read_images(source, indices: list[int], size: int, transform):
    """``(indices, images (B, 3, H, W), labels)`` of a map-style source in chunks of ``size`` indices."""
    for s in range(0, len(indices), size):
        chunk = indices[s:s + size]
        xs, labels = [], []
        for i in chunk:
            image, _, label = source.read(i)
            xs.append(transform(image))
            labels.append(label)
        yield torch.tensor(chunk), torch.stack(xs), torch.tensor(labels)
