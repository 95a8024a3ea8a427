"""Exported codes read back for training: :class:`CodeDataset` memory-maps the ``uint16`` shards of an
export directory (see :mod:`unitok.codes.export`) and yields one item's codes, label and caption."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch

from .format import CodeFormatError, check_agreement, read_manifest


class CodeDataset(torch.utils.data.Dataset):
    """Exported codes, memory-mapped (``np.load(mmap_mode='r', allow_pickle=False)``), as a map-style dataset.

    Args:
        directory: an export directory (``unitok export-codes --out``).
        view: ``'all'`` -> codes ``(A, K, h, w)``; ``'random'`` -> one view ``(K, h, w)`` drawn per
            (seed, epoch, item); an int -> that view ``(K, h, w)``.
        label: which label set ``label`` holds (a name of ``label_sets``; default the first).
        caption: ``'first'`` or ``'random'`` (one of an item's caption alternatives, drawn like views).
        seed: seed of the random draws; :meth:`set_epoch` changes them per epoch.

    Items are dicts: ``codes`` int64 tensor, ``label`` int (-1: none), ``caption`` str, ``index`` int.
    """

    def __init__(self, directory: str, view: str | int = 'all', label: str | None = None,
                 caption: str = 'first', seed: int = 0):
        self.directory = directory
        self.manifest = m = read_manifest(directory)
        self.view_names = list(m['views'])
        if view not in ('all', 'random') and not (isinstance(view, int) and 0 <= view < len(self.view_names)):
            raise ValueError(f"view must be 'all', 'random' or a view index in [0, {len(self.view_names)}) "
                             f'({self.view_names}), got {view!r}')
        if caption not in ('first', 'random'):
            raise ValueError(f"caption must be 'first' or 'random', got {caption!r}")
        names = [s['name'] for s in m['label_sets']]
        if label is not None and label not in names:
            raise ValueError(f'unknown label set {label!r}; this export has {names}')
        self.label_column = names.index(label) if label is not None else (0 if names else None)
        self.view, self.caption_mode, self.seed, self.epoch = view, caption, seed, 0
        tok = m['tokenizer']
        self.num_codebooks, self.codebook_size, self.grid = tok['num_codebooks'], tok['codebook_size'], tuple(tok['grid'])
        self.shard_names = [s['name'] for s in m['shards']]
        counts = np.asarray([s['count'] for s in m['shards']], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._arrays: dict[int, tuple] = {}
        self._meta: dict[int, list] = {}
        vocab = tok.get('vocab_sizes') or [self.codebook_size] * self.num_codebooks
        self._vocab = np.asarray(vocab, dtype=np.int64)
        for s in range(len(self.shard_names)):      # every shard checked once: bad data fails here, not mid-training
            self._check_shard(s)

    # -- properties
    @property
    def num_views(self) -> int:
        return len(self.view_names)

    @property
    def label_sets(self) -> dict[str, list[str]]:
        return {s['name']: s['classnames'] for s in self.manifest['label_sets']}

    @property
    def classnames(self) -> list[str] | None:
        """Class names of the selected label set (None without labels)."""
        if self.label_column is None:
            return None
        return self.manifest['label_sets'][self.label_column]['classnames']

    @property
    def skipped(self) -> list[dict]:
        return self.manifest['skipped']

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- checks
    def expect(self, num_codebooks: int | None = None, codebook_size: int | None = None,
               grid: Sequence[int] | None = None, what: str = 'the model') -> None:
        """Raise one :class:`CodeFormatError` listing every way these codes do not fit ``what`` (a model
        trained on codes: K, codes per sub-code, grid)."""
        mine = dict(num_codebooks=num_codebooks, codebook_size=codebook_size, grid=None if grid is None else list(grid))
        check_agreement(self.manifest['tokenizer'], mine, where=f'the export {self.directory!r}', consumer=what)

    def check_tokenizer(self, model_or_config) -> None:
        """Raise one :class:`CodeFormatError` unless these codes were exported by this tokenizer (config
        hash, K, codebook size, grid; with a model also its quantizer and code vectors)."""
        check_agreement(self.manifest['tokenizer'], model_or_config, where=f'the export {self.directory!r}',
                        consumer='this tokenizer', fix='export them again with this one')

    # -- access
    def _open(self, s: int) -> tuple:
        if s not in self._arrays:
            n = int(self._starts[s + 1] - self._starts[s])
            h, w = self.grid
            want = {'codes': ((n, self.num_views, self.num_codebooks, h, w), np.uint16),
                    'labels': ((n, len(self.manifest['label_sets'])), np.int64), 'index': ((n,), np.int64)}
            arrays = []
            for part, (shape, dtype) in want.items():
                path = self._path(part, s)
                try:
                    a = np.load(path, mmap_mode='r', allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise CodeFormatError(f'cannot read {path!r}: {e}') from None
                if a.shape != shape or a.dtype != dtype:
                    raise CodeFormatError(f'{path!r} holds {a.dtype} {a.shape}, the manifest says '
                                          f'{np.dtype(dtype).name} {shape}')
                arrays.append(a)
            self._arrays[s] = tuple(arrays)
        return self._arrays[s]

    def _check_shard(self, s: int, chunk: int = 4096) -> None:
        """Codes in their sub-codebook's range, labels in their label set's, one well-formed caption row
        per item; one :class:`CodeFormatError` naming the shard file and the item otherwise. Reads the
        memory maps in chunks of ``chunk`` items (bounded memory, one pass)."""
        codes, labels, _ = self._open(s)
        rows = self._captions(s)
        name, start = self.shard_names[s], int(self._starts[s])

        def item(j: int) -> str:
            return f'item {j} of shard {name} (item {start + j} of the export, key {rows[j].get("key")!r})'
        sizes = [len(c['classnames']) for c in self.manifest['label_sets']]
        for lo in range(0, len(codes), chunk):
            block = np.asarray(codes[lo:lo + chunk])
            high = block.max(axis=(1, 3, 4)).astype(np.int64)           # (items, K)
            bad = np.argwhere(high >= self._vocab)
            if len(bad):
                j, k = int(bad[0][0]), int(bad[0][1])
                raise CodeFormatError(f'{self._path("codes", s)!r}: {item(lo + j)} has code {high[j, k]} in '
                                      f'sub-codebook {k}, outside [0, {self._vocab[k]}); export the codes again')
            lab = np.asarray(labels[lo:lo + chunk])
            for c, n in enumerate(sizes):
                wrong = np.flatnonzero((lab[:, c] < -1) | (lab[:, c] >= n))
                if len(wrong):
                    j = int(wrong[0])
                    raise CodeFormatError(f'{self._path("labels", s)!r}: {item(lo + j)} has label {lab[j, c]} in '
                                          f'label set {self.manifest["label_sets"][c]["name"]!r}, outside '
                                          f'[-1, {n}); export the codes again')

    def _path(self, part: str, s: int) -> str:
        suffix = 'jsonl' if part == 'meta' else 'npy'
        return os.path.join(self.directory, f'{part}-{self.shard_names[s]}.{suffix}')

    def _captions(self, s: int) -> list:
        if s not in self._meta:
            path = self._path('meta', s)
            rows = []
            try:
                with open(path, encoding='utf-8') as f:
                    for line in f:
                        if line.strip():
                            rows.append(json.loads(line))
            except (OSError, UnicodeDecodeError) as e:
                raise CodeFormatError(f'cannot read {path!r}: {e}') from None
            except json.JSONDecodeError as e:
                raise CodeFormatError(f'{path!r}: the row of item {len(rows)} of shard {self.shard_names[s]} is '
                                      f'not JSON ({e}); the file is cut or damaged, export the codes again') from None
            for j, row in enumerate(rows):
                if not (isinstance(row, dict) and isinstance(row.get('captions'), list)
                        and all(isinstance(c, str) for c in row['captions'])):
                    raise CodeFormatError(f'{path!r}: the row of item {j} of shard {self.shard_names[s]} has no '
                                          'list of caption strings; export the codes again')
            if len(rows) != self._starts[s + 1] - self._starts[s]:
                raise CodeFormatError(f'{path!r} has {len(rows)} rows, the manifest says '
                                      f'{self._starts[s + 1] - self._starts[s]}; the file is cut or damaged, '
                                      'export the codes again')
            self._meta[s] = rows
        return self._meta[s]

    def __getstate__(self):           # DataLoader workers re-open the memory maps instead of copying them
        state = dict(self.__dict__)
        state['_arrays'], state['_meta'] = {}, {}
        return state

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f'index {i} out of range for {len(self)} items')
        i %= len(self)
        s = int(np.searchsorted(self._starts, i, side='right') - 1)
        return s, i - int(self._starts[s])

    def key(self, i: int) -> str:
        s, j = self._locate(i)
        return self._captions(s)[j]['key']

    def captions(self, i: int) -> list[str]:
        s, j = self._locate(i)
        return self._captions(s)[j]['captions']

    def codes(self, i: int) -> np.ndarray:
        """The ``(A, K, h, w)`` uint16 codes of item ``i`` (a view of the memory map)."""
        s, j = self._locate(i)
        return self._open(s)[0][j]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, j = self._locate(i)
        codes, labels, index = self._open(s)
        rng = np.random.default_rng([self.seed, self.epoch, int(self._starts[s]) + j])
        view = int(rng.integers(self.num_views)) if self.view == 'random' else self.view
        c = codes[j] if view == 'all' else codes[j, view]
        captions = self._captions(s)[j]['captions']
        caption = ''
        if captions:
            caption = captions[int(rng.integers(len(captions)))] if self.caption_mode == 'random' else captions[0]
        label = int(labels[j, self.label_column]) if self.label_column is not None else -1
        return dict(codes=torch.from_numpy(c.astype(np.int64)), label=label, caption=caption, index=int(index[j]))

