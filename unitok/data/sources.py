"""Image-text sources with random access: a folder with captions, and the built-in dataset.

A source is a sized collection; ``read(i)`` returns ``(PIL image, caption, label)`` or raises
:class:`~unitok.images.ImageReadError` for an unreadable file. A caption may be a list of
alternatives (several captions per image, as in COCO): training draws one at random per sample,
evaluation uses the first. Labels (class indices into ``classnames``) are optional and used by
zero-shot evaluation.
"""
from __future__ import annotations

import csv
import json
import os
from functools import lru_cache

from PIL import Image

from ..images import IMAGE_EXTENSIONS, load_image

BUILTIN_DIR = os.path.join(os.path.dirname(__file__), 'builtin')
CAPTION_FILES = ('captions.jsonl', 'captions.csv', 'captions.tsv')


class FolderSource:
    """Images under a directory, with captions from ``captions.jsonl`` / ``.csv`` / ``.tsv``.

    Caption files have a ``file`` (path relative to the directory) and a ``caption`` field, and
    optionally ``label`` (a class name). Without a caption file every image below the directory is
    used; images in class sub-folders get the label of their folder and the caption
    ``"a photo of a {label}"``, others their file name as caption.
    """

    templates = ('a photo of a {}.', 'a picture of a {}.', 'an image of a {}.')

    def __init__(self, root: str, captions: str | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f'no such directory: {root!r}')
        self.root = root
        captions = captions or next((os.path.join(root, c) for c in CAPTION_FILES
                                     if os.path.isfile(os.path.join(root, c))), None)
        rows = _read_captions(captions) if captions else _scan(root)
        if not rows:
            raise ValueError(f'{captions} lists no images' if captions else f'no images found in {root!r}')
        self.files = [r['file'] for r in rows]
        self.captions = [r['caption'] for r in rows]
        names = sorted({r['label'] for r in rows if r.get('label')})
        self.classnames = names or None
        index = {n: i for i, n in enumerate(names)}
        self.labels = [index.get(r.get('label'), -1) for r in rows]

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i: int) -> str:
        return self.files[i]

    def read(self, i: int):
        return load_image(os.path.join(self.root, self.files[i])), self.captions[i], self.labels[i]


def _read_captions(path: str) -> list[dict]:
    rows = []
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no caption file at {path!r}')
    try:
        with open(path, encoding='utf-8', newline='') as f:
            if path.endswith('.jsonl'):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f'{path}:{n}: invalid JSON ({e})') from None
            else:
                rows = list(csv.DictReader(f, delimiter='\t' if path.endswith('.tsv') else ','))
    except UnicodeDecodeError as e:
        raise ValueError(f'{path}: not UTF-8 text ({e})') from None
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise ValueError(f'{path}: row {n} must be an object with "file" and "caption", got {r!r}')
        if not r.get('file') or r.get('caption') is None:
            raise ValueError(f'{path}: row {n} needs "file" and "caption" fields, got {sorted(r)}')
        caption, label = r['caption'], r.get('label')
        if isinstance(caption, list):
            if not caption:
                raise ValueError(f'{path}: row {n} has an empty caption list')
            if not all(isinstance(c, str) for c in caption):
                raise ValueError(f'{path}: row {n}: every caption in the list must be a string, got {caption!r}')
        elif not isinstance(caption, str):
            raise ValueError(f'{path}: row {n}: caption must be a string or a list of strings, got {caption!r}')
        if not isinstance(r['file'], str):
            raise ValueError(f'{path}: row {n}: file must be a string path, got {r["file"]!r}')
        if label is not None and not isinstance(label, str):
            raise ValueError(f'{path}: row {n}: label must be a class name (string), got {label!r}')
    return rows


def _scan(root: str) -> list[dict]:
    rows = []
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                parts = rel.split(os.sep)
                label = parts[0] if len(parts) > 1 else None
                caption = f'a photo of a {label.replace("_", " ")}' if label else \
                    os.path.splitext(name)[0].replace('_', ' ').replace('-', ' ')
                rows.append(dict(file=rel, caption=caption, label=label))
    return rows


class BuiltinSource:
    """The built-in emoji dataset (Noto + Twemoji, 64 px, see ``builtin/emoji/LICENSE.md``).

    Args:
        split: ``'train'`` (3432 images) or ``'val'`` (380 images of emoji absent from train).
        label: ``'category'`` (9 classes) or ``'subcategory'`` (~95 classes) for zero-shot evaluation.
        caption_variants: give each image several captions built from its name, subcategory and
            category (default: for the train split), so that a small text tower learns the words
            instead of memorising 1.7k fixed sentences.
    """

    templates = ('an emoji of {}.', 'a {} emoji.', '{}')

    def __init__(self, name: str = 'emoji', split: str = 'train', label: str = 'category',
                 caption_variants: bool | None = None):
        index = _builtin_index(name)
        if split not in ('train', 'val', 'all'):
            raise ValueError(f"builtin split must be 'train', 'val' or 'all', got {split!r}")
        if label not in ('category', 'subcategory'):
            raise ValueError(f"builtin label must be 'category' or 'subcategory', got {label!r}")
        self.name, self.directory = name, os.path.join(BUILTIN_DIR, name)
        self.cell, self.grid = index['cell'], index['grid']
        self.samples = [s for s in index['samples'] if split == 'all' or s['split'] == split]
        self.classnames = sorted({_label_text(s[label]) for s in index['samples']})
        lookup = {c: i for i, c in enumerate(self.classnames)}
        self.labels = [lookup[_label_text(s[label])] for s in self.samples]
        self.captions = [s['caption'] for s in self.samples]
        self.caption_variants = split == 'train' if caption_variants is None else caption_variants

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, i: int) -> str:
        s = self.samples[i]
        return f"{s['style']}/{s['unified']}"

    def read(self, i: int):
        s = self.samples[i]
        sheet = _atlas(os.path.join(self.directory, s['atlas']))
        col, row = s['cell'] % self.grid, s['cell'] // self.grid
        box = (col * self.cell, row * self.cell, (col + 1) * self.cell, (row + 1) * self.cell)
        caption = s['caption']
        if self.caption_variants:
            name, sub, cat = s['name'], _label_text(s['subcategory']), s['category'].lower()
            caption = [caption, f'{name}', f'an emoji of {name}', f'a {cat} emoji', f'{sub}, {cat}',
                       f'a {sub} emoji: {name}', f'{name}, {cat}']
        return sheet.crop(box), caption, self.labels[i]


def _label_text(x: str) -> str:
    return x.replace('-', ' ').lower()


@lru_cache(maxsize=4)
def _builtin_index(name: str) -> dict:
    path = os.path.join(BUILTIN_DIR, name, 'index.json')
    if not os.path.isfile(path):
        available = sorted(d for d in os.listdir(BUILTIN_DIR) if os.path.isdir(os.path.join(BUILTIN_DIR, d)))
        raise ValueError(f'unknown built-in dataset {name!r}; available: {available}')
    with open(path, encoding='utf-8') as f:
        return json.load(f)


@lru_cache(maxsize=32)
def _atlas(path: str) -> Image.Image:
    return load_image(path)
