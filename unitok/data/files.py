"""Image files for inference (``unitok encode`` / ``reconstruct``): found under paths
(:func:`collect_images`), batched in file order, read, decoded and resized in DataLoader worker
processes while the model runs on the previous batch.

Batches hold ``batch_size`` consecutive files; an unreadable file is left out of its batch (so the
model sees exactly the images it would see reading the files one by one in the main process) and
reported, or, without ``skip_bad``, stops the iteration with the :class:`~unitok.images.ImageReadError`
that reading it in the main process raises.
"""
from __future__ import annotations

import os
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..images import IMAGE_EXTENSIONS, ImageReadError, load_image, to_tensor
from .stream import _worker_init


def collect_images(paths: list[str]) -> list[str]:
    """Expand directories (recursively, sorted) into image files; explicit files are kept as given."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.exists(p):
            files.append(p)
        else:
            raise FileNotFoundError(f'no such file or directory: {p!r}')
    if not files:
        raise ValueError(f'no image files found in {paths}')
    return files


def default_workers() -> int:
    """Loader workers used when none are asked for: one core per worker beside the main process
    (which runs the model), at most 4; 0 on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


class FileBatch(NamedTuple):
    images: torch.Tensor | None          # (n, 3, size, size) in [-1, 1] of the readable files; None if none
    files: list[str]                     # the readable files, in order
    skipped: list[tuple[str, str]]       # (file, reason) of the unreadable ones


class ImageFiles(Dataset):
    """Item ``i`` -> ``(tensor (3, size, size) or None, reason or None)``: file ``i`` through
    :func:`~unitok.images.to_tensor` (shorter side to ``size``, centre crop)."""

    def __init__(self, files: list[str], size: int):
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            return to_tensor(load_image(self.files[i]), size=self.size)[0], None
        except ImageReadError as e:
            return None, str(e)


def image_file_batches(files: list[str], size: int, batch_size: int, workers: int = 0,
                       skip_bad: bool = False, pin_memory: bool = False) -> Iterator[FileBatch]:
    """Batches (:class:`FileBatch`) of ``batch_size`` consecutive ``files`` (see the module docstring).

    Args:
        workers: decoding processes (0: in this process). A single batch is always read here, as
            workers could not overlap it with anything.
        skip_bad: report unreadable files in :attr:`FileBatch.skipped` instead of raising.
        pin_memory: page-locked batches, for fast copies to a GPU.
    """
    if workers < 0:
        raise ValueError(f'workers must be >= 0, got {workers}')
    dataset = ImageFiles(files, size)
    batches = [list(range(i, min(i + batch_size, len(files)))) for i in range(0, len(files), batch_size)]
    workers = workers if len(batches) > 1 else 0
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        pin_memory=pin_memory, worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=2 if workers else None)
    for indices, (images, reasons) in zip(batches, loader):
        kept = [i for i, why in zip(indices, reasons) if why is None]
        skipped = [(files[i], why) for i, why in zip(indices, reasons) if why is not None]
        if skipped and not skip_bad:
            raise ImageReadError(skipped[0][1])
        yield FileBatch(images, [files[i] for i in kept], skipped)


def _collate(items: list[tuple[torch.Tensor | None, str | None]]) -> tuple[torch.Tensor | None, list]:
    """(stacked tensors of the readable items or None, per-item reason or None)."""
    tensors = [x for x, _ in items if x is not None]
    return (torch.stack(tensors) if tensors else None), [why for _, why in items]
