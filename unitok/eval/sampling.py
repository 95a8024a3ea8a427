"""Planned sampling: fixed chunks of sample indices with their seeds, re-batching of per-chunk
outputs, and rows gathered over processes in sample order."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ..utils import distributed as D
from ..utils.seeds import mix_seed


def sample_chunks(num_classes: int, per_class: int, chunk: int, seed: int) -> list[tuple[int, int, int]]:
    """``(first sample, end, seed)`` of every chunk of ``chunk`` consecutive sample indices; sample
    ``s`` has class ``s // per_class`` and chunk ``i`` the seed ``mix_seed(seed, i)``."""
    total = num_classes * per_class
    return [(s, min(s + chunk, total), mix_seed(seed, i)) for i, s in enumerate(range(0, total, chunk))]


def rebatch(pieces: Iterable[tuple[torch.Tensor, ...]], size: int) -> Iterator[tuple[torch.Tensor, ...]]:
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


def gather_rows(index: list[torch.Tensor], rows: dict[str, list[torch.Tensor]], group) -> dict[str, torch.Tensor]:
    """Rows of every rank, in ascending sample index."""
    local = {'index': torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
             **{k: torch.cat(v) if v else torch.zeros(0) for k, v in rows.items()}}
    parts = D.all_gather_object(local, group=group)
    idx = torch.cat([p['index'] for p in parts])
    order = idx.argsort()
    return {k: torch.cat([p[k] for p in parts if p[k].numel()])[order] if idx.numel() else torch.zeros(0)
            for k in local if k != 'index'}


def progress_bar(iterable, desc, total, show):
    """``iterable`` with a tqdm bar (``desc``, ``total`` steps) when ``show``, else as it is."""
    if not show:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total)


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``(start, end)`` of consecutive chunks of ``size`` out of ``n``."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]
