"""Deterministic, resumable streams of training samples, split over ranks and loader workers.

Every rank r and (logical) loader worker w reads its own endless stream ``s = r * W + w`` of raw
samples. The stream, the random augmentations of each sample (seeded from the sample's position)
and hence every batch are a pure function of ``(seed, s, position)``. The trainer records the next
position of every worker stream; resuming there reproduces the uninterrupted run exactly.
Unreadable samples are skipped; each batch says how many were skipped, and which.
"""
from __future__ import annotations

import random
import signal
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from ..images import ImageReadError
from ..utils.seeds import mix_seed

MAX_REPORTED_KEYS = 8


def map_positions(n: int, shard: int, num_shards: int, seed: int, start: int = 0) -> Iterator[tuple[int, tuple[int, int]]]:
    """Endless ``(position, (epoch, index))`` over epochs of a size-n collection: each epoch is a fresh
    seeded permutation and this shard takes every ``num_shards``-th element (the remainder is dropped)."""
    per_epoch = n // num_shards
    if per_epoch == 0:
        raise ValueError(f'{n} samples cannot feed {num_shards} rank x worker streams')
    position, perm_epoch, perm = start, -1, None
    while True:
        epoch, j = divmod(position, per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
            perm_epoch = epoch
        yield position, (epoch, int(perm[shard + j * num_shards]))
        position += 1


MAX_CONSECUTIVE_FAILURES = 1000


class DataError(RuntimeError):
    """The training data cannot feed the loop (e.g. every sample is unreadable)."""


def image_text_sample(transform: Callable, tokenize: Callable) -> Callable:
    """``prepare`` for image-caption sources: ``(image, caption(s), label)`` -> tensors. With several
    caption alternatives one is drawn per sample (from the per-sample seeded RNG)."""
    def prepare(raw) -> dict[str, Any]:
        image, caption, label = raw
        image = transform(image)
        if isinstance(caption, (list, tuple)):
            caption = random.choice(caption)
        return dict(image=image, text=tokenize(caption), label=label)
    return prepare


class TrainStream(IterableDataset):
    """Endless prepared samples plus ``'position', 'worker', 'skipped', 'skipped_keys'``.

    Args:
        source: a map-style source (``read(i)``, ``key(i)``) or a :class:`WebDatasetSource` (``iter_raw``).
        transform, tokenize: for image-caption sources (PIL image -> tensor, caption -> token ids);
            or ``prepare``: raw item of the source -> dict of tensors (any task's samples).
        seed, rank, world_size: the stream of (rank, worker) is ``rank * num_workers + worker``.
        num_workers: loader workers (0 = the main process).
        start_positions: next position per logical worker (from a checkpoint).
        worker_offset: logical id of physical worker 0, so that the loader's round-robin order
            continues where the interrupted run stopped.
        max_failures: after this many unreadable samples in a row the stream reports a
            :class:`DataError` instead of searching forever.
    """

    def __init__(self, source, transform: Callable | None = None, tokenize: Callable | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 start_positions: dict[int, int] | None = None, worker_offset: int = 0,
                 prepare: Callable | None = None, max_failures: int = MAX_CONSECUTIVE_FAILURES):
        super().__init__()
        if prepare is None:
            if transform is None or tokenize is None:
                raise TypeError('TrainStream needs prepare=, or transform= and tokenize=')
            prepare = image_text_sample(transform, tokenize)
        self.source, self.prepare = source, prepare
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.start_positions = dict(start_positions or {})
        self.worker_offset = worker_offset
        self.max_failures = max_failures

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.worker_offset) % self.num_workers
        stream = self.rank * self.num_workers + worker
        num_streams = self.world_size * self.num_workers
        start = self.start_positions.get(worker, 0)
        if hasattr(self.source, 'iter_raw'):
            raw = self.source.iter_raw(stream, num_streams, self.seed, start)
            decode, key = self.source.decode, self.source.key
            identity = lambda position, item: (stream, position)    # noqa: E731
        else:
            raw = map_positions(len(self.source), stream, num_streams, self.seed, start)
            decode, key = (lambda item: self.source.read(item[1])), (lambda item: self.source.key(item[1]))
            identity = lambda position, item: item                  # noqa: E731  (epoch, index)
        skipped, keys = 0, []
        for position, item in raw:
            # Augmentations draw from the global RNGs of this process: seed them per sample. Map-style
            # samples are seeded by (epoch, index), so the split over ranks and workers does not matter.
            sample_seed = mix_seed(self.seed, *identity(position, item))
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            try:
                sample = self.prepare(decode(item))
            except (ImageReadError, OSError, ValueError) as e:
                skipped += 1
                if len(keys) < MAX_REPORTED_KEYS:
                    keys.append(f'{key(item)}: {e}'[:300])
                if skipped >= self.max_failures:
                    # Reported through the batch, not raised: a worker's exception would reach the
                    # training process wrapped in a traceback of the worker.
                    yield dict(error=f'{skipped} unreadable samples in a row (last: {keys[-1] if keys else "?"}); '
                                     'the data source seems unusable', worker=worker, position=position)
                    return
                continue
            yield dict(sample=sample, position=position, worker=worker, skipped=skipped, skipped_keys=keys)
            skipped, keys = 0, []


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack a list of stream samples (all from one worker) into a batch (``error`` passes through)."""
    failed = [s for s in samples if 'error' in s]
    if failed:
        return dict(error=failed[0]['error'])
    batch = default_collate([s['sample'] for s in samples])
    batch.update(worker=samples[0]['worker'], position=max(s['position'] for s in samples),
                 skipped=sum(s['skipped'] for s in samples),
                 skipped_keys=[k for s in samples for k in s['skipped_keys']])
    return batch


def _worker_init(worker_id: int) -> None:
    # Ctrl-C and SIGTERM reach the whole process group (timeout, SLURM, Kubernetes, cgroup kills):
    # the training process decides how to stop (checkpoint, then exit) and shuts its workers down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader(stream: TrainStream, batch_size: int, num_workers: int) -> DataLoader:
    # A private generator: creating worker processes must not draw from the training process's global
    # RNG (that would shift every later random number after a resume). Samples are seeded per position.
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=_worker_init if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(mix_seed(stream.seed, stream.rank)))


class ResumableBatches:
    """Micro-batches of a :class:`TrainStream` with the bookkeeping that makes resume exact: the next
    position of every worker stream, the number of batches consumed, skipped-sample counts.

    ``state_dict()`` is per rank; a loader restarted from it continues the same batch sequence.
    """

    def __init__(self, make_stream: Callable[[dict[int, int], int], TrainStream], batch_size: int, num_workers: int):
        self.make_stream, self.batch_size, self.num_workers = make_stream, batch_size, num_workers
        self.positions: dict[int, int] = {}
        self.consumed = 0
        self.skipped = 0
        self.skipped_examples: list[str] = []
        self._iter = None

    def __next__(self) -> dict:
        if self._iter is None:
            stream = self.make_stream(self.positions, self.consumed % max(1, self.num_workers))
            self._iter = iter(train_loader(stream, self.batch_size, self.num_workers))
        batch = next(self._iter)
        if 'error' in batch:
            raise DataError(batch['error'])
        self.consumed += 1
        self.positions[batch['worker']] = batch['position'] + 1
        self.skipped += batch['skipped']
        self.skipped_examples += batch['skipped_keys'][:max(0, 100 - len(self.skipped_examples))]
        return batch

    def __iter__(self):
        return self

    def close(self) -> None:
        """Shut the loader workers down now (they ignore SIGTERM, so they must be asked to stop: the
        iterator's destructor sends them the end-of-work message and joins them)."""
        it, self._iter = self._iter, None
        del it

    def state_dict(self) -> dict:
        return {'positions': dict(self.positions), 'consumed': self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.positions = {int(k): int(v) for k, v in state['positions'].items()}
        self.consumed = int(state['consumed'])
        self._iter = None
