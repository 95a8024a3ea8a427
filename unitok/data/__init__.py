"""Image-text data: sources (folder + captions, webdataset shards, the built-in dataset), the
training and evaluation transforms, and deterministic resumable training streams.

A data *spec* names a source:

* ``builtin:emoji`` -- the built-in dataset (``builtin:emoji:subcategory`` for fine labels);
* ``wds:PATTERN`` or a pattern ending in ``.tar`` -- webdataset shards, e.g. ``data/{000000..000099}.tar``;
* ``folder:DIR`` or a directory -- images with ``captions.jsonl|csv|tsv`` (or class sub-folders).
  If ``DIR/train`` and ``DIR/val`` exist, the split picks one of them.
"""
from __future__ import annotations

import os

from .sources import BuiltinSource, FolderSource
from .stream import DataError, ResumableBatches, TrainStream, collate, image_text_sample, mix_seed, train_loader
from .transforms import eval_transform, train_transform
from .webdataset import WebDatasetSource


def _is_shards(spec: str) -> bool:
    return spec.startswith('wds:') or spec.rstrip('}').endswith('.tar') or '.tar::' in spec


def has_split(spec: str, split: str) -> bool:
    """Whether ``spec`` names a distinct ``split``: the built-in datasets have 'train' and 'val'; a
    folder has one when ``DIR/split`` exists (otherwise every split is the folder itself); shards
    never do (name held-out shards explicitly)."""
    if spec.startswith('builtin:'):
        return split in ('train', 'val')
    if _is_shards(spec):
        return False
    root = spec[7:] if spec.startswith('folder:') else spec
    return os.path.isdir(os.path.join(root, split))


def open_source(spec: str, split: str = 'train', resampled: bool = True, shuffle_buffer: int = 1000):
    """The source named by a data spec (see the module docstring)."""
    if spec.startswith('builtin:'):
        parts = spec.split(':')
        return BuiltinSource(parts[1], split=split, label=parts[2] if len(parts) > 2 else 'category')
    if _is_shards(spec):
        return WebDatasetSource(spec[4:] if spec.startswith('wds:') else spec, resampled=resampled,
                                shuffle_buffer=shuffle_buffer)
    root = spec[7:] if spec.startswith('folder:') else spec
    if os.path.isdir(os.path.join(root, split)):
        root = os.path.join(root, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f'data spec {spec!r}: no such directory, not builtin:NAME, not .tar shards')
    return FolderSource(root)


__all__ = ['open_source', 'has_split', 'BuiltinSource', 'FolderSource', 'WebDatasetSource', 'TrainStream', 'ResumableBatches',
           'DataError', 'image_text_sample', 'train_loader', 'collate', 'mix_seed', 'train_transform', 'eval_transform']
