"""The images of a data source, read and turned into views in loader processes, in the batches and
shards of an export (map-style sources by item index, webdataset shards by tar and position)."""
from __future__ import annotations

import re

import torch

from ..images import ImageReadError
from .views import ViewTransform


def read_label_sets(source, spec: str, split: str) -> list[tuple[str, list[str], list[int] | None]]:
    """(name, class names, per-item labels or None = the label ``read`` returns) of every label set."""
    from ..data import BuiltinSource
    if isinstance(source, BuiltinSource):
        parts = spec.split(':')
        primary = parts[2] if len(parts) > 2 else 'category'
        sets = [(primary, list(source.classnames), list(source.labels))]
        for other in ('category', 'subcategory'):
            if other != primary:
                alt = BuiltinSource(source.name, split=split, label=other)
                sets.append((other, list(alt.classnames), list(alt.labels)))
        return sets
    names = getattr(source, 'classnames', None)
    return [('label', list(names), None)] if names else []



def count_items(source, cfg) -> int:
    return len(source) if cfg.limit is None else min(cfg.limit, len(source))



class _MapItems(torch.utils.data.Dataset):
    """Item i of a map-style source -> ('ok', i, key, views, captions, labels) or ('error', i, key, reason)."""

    def __init__(self, source, views: ViewTransform, label_sets):
        self.source, self.views, self.label_sets = source, views, label_sets

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        key = self.source.key(i)
        try:
            image, caption, label = self.source.read(i)
            x = self.views(image)
        except (ImageReadError, OSError, ValueError) as e:
            return ('error', i, key, _reason(e))
        labels = [label if per_item is None else per_item[i] for _, _, per_item in self.label_sets]
        return ('ok', i, key, x, _caption_list(caption), labels)


def _reason(e: Exception) -> str:
    """The error message without object addresses (``<_io.BytesIO object at 0x...>``): reruns record the same."""
    return re.sub(r' at 0x[0-9a-fA-F]+', '', str(e))[:300]


def _caption_list(caption) -> list[str]:
    if caption is None:
        return []
    return [str(c) for c in caption] if isinstance(caption, (list, tuple)) else [str(caption)]


def map_batches(source, cfg, views, label_sets, shards: list[int]):
    """(shard, batch of item results, last batch of the shard?) for map-style sources."""
    n = count_items(source, cfg)
    plan = []
    for c in shards:
        items = list(range(c * cfg.shard_size, min((c + 1) * cfg.shard_size, n)))
        for s in range(0, len(items), cfg.batch_size):
            plan.append((c, items[s:s + cfg.batch_size], s + cfg.batch_size >= len(items)))
    from ..data.stream import _worker_init
    loader = torch.utils.data.DataLoader(_MapItems(source, views, label_sets), batch_sampler=[p[1] for p in plan],
                                         num_workers=cfg.workers, collate_fn=list,
                                         worker_init_fn=_worker_init if cfg.workers else None)
    for (c, _, last), batch in zip(plan, loader):
        yield (0, c), batch, last, None


def _stream_plan(source, cfg, tars: list[int], done):
    """(shard, [(position, raw sample)], last batch of the shard?, end of tar?) for webdataset shards:
    tar ``t`` in chunks of ``shard_size`` raw samples, resumed after its finished chunks. Reading
    raw samples is cheap; decoding them is left to :func:`_decode_raw`."""
    import itertools
    for t in tars:
        chunk = 0
        while (t, chunk) in done:
            chunk += 1
        raw = itertools.islice(source.iter_once(t, len(source.urls)), chunk * cfg.shard_size, None)
        position, pending = chunk * cfg.shard_size, next(raw, None)
        while True:
            batch, in_chunk = [], 0
            while pending is not None and in_chunk < cfg.shard_size:
                batch.append((position, pending))
                position, in_chunk, pending = position + 1, in_chunk + 1, next(raw, None)
                if len(batch) == cfg.batch_size and in_chunk < cfg.shard_size:
                    yield (t, chunk), batch, False, False
                    batch = []
            yield (t, chunk), batch, True, pending is None
            if pending is None:
                break
            chunk += 1


def _decode_raw(source, views, batch: list) -> list[tuple]:
    """Raw samples -> item results, as :class:`_MapItems` gives them (no labels in shards)."""
    out = []
    for position, raw in batch:
        key = source.key(raw)
        try:
            image, caption, _ = source.decode(raw)
            out.append(('ok', position, key, views(image), _caption_list(caption), []))
        except (ImageReadError, OSError, ValueError) as e:
            out.append(('error', position, key, _reason(e)))
    return out


class _StreamItems(torch.utils.data.IterableDataset):
    """The batches of :func:`_stream_plan`, decoded. Loader worker ``w`` of ``W`` reads the whole plan
    but decodes (and yields) only batches ``w, w + W, ...``; the DataLoader takes one batch from each
    worker in turn, so they arrive in plan order."""

    def __init__(self, source, cfg, views, tars: list[int], done):
        self.source, self.cfg, self.views, self.tars, self.done = source, cfg, views, tars, done

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, (shard, batch, last, end_of_tar) in enumerate(_stream_plan(self.source, self.cfg, self.tars, self.done)):
            if k % workers == worker:
                yield shard, _decode_raw(self.source, self.views, batch), last, end_of_tar


def _as_is(item):
    return item


def stream_batches(source, cfg, views, tars: list[int], done):
    """(shard, batch of item results, last batch of the shard?, end of tar?) for webdataset shards,
    decoded in ``cfg.workers`` loader processes."""
    from ..data.stream import _worker_init
    yield from torch.utils.data.DataLoader(_StreamItems(source, cfg, views, tars, done), batch_size=None,
                                           num_workers=cfg.workers, collate_fn=_as_is,
                                           worker_init_fn=_worker_init if cfg.workers else None)

