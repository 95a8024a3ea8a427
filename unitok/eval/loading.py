"""Reading evaluation inputs: the fixed subsets of a data source, its images and captions, the
generator with its tokenizer, and the labelled items of exported codes."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Sequence

import torch

from ..data import open_source
from ..images import ImageReadError

TRAINING_INFO = 'training.json'           # written beside a trained MLLM by the training task


class GenEvalError(ValueError):
    """The generator, tokenizer and data cannot be evaluated together (named in the message)."""


class MLLMEvalError(ValueError):
    """The MLLM, its codes and the data cannot be evaluated together (named in the message)."""


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


def load_generator(gen_path: str, tokenizer_path: str | None = None, device: str | torch.device = 'cpu'):
    """``(generator, tokenizer, generation info)`` from ``RUN/model`` (with its ``generation.json``);
    the tokenizer defaults to the one recorded there and must be the one whose codes it was trained on."""
    from ..checkpoint import CheckpointError
    from ..generation import GeneratorModel
    from ..generation.codes import tokenizer_identity
    from ..model import UniTok
    from ..train.tasks.generator import GENERATION_INFO
    generator = GeneratorModel.from_pretrained(gen_path, map_location=device)
    info_path = os.path.join(gen_path, GENERATION_INFO)
    info = {}
    if os.path.isfile(info_path):
        try:
            with open(info_path, encoding='utf-8') as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f'cannot read {info_path}: {e}') from None
    tokenizer_path = tokenizer_path or info.get('tokenizer')
    if not tokenizer_path:
        raise GenEvalError(f'no tokenizer: {info_path} names none; pass --tokenizer (the UniTok model whose codes '
                           'the generator was trained on)')
    tokenizer = UniTok.from_pretrained(tokenizer_path).to(device).eval()
    mine, theirs = tokenizer_identity(tokenizer), info.get('codes_tokenizer')
    if theirs and any(mine[k] is not None and theirs.get(k) != mine[k] for k in mine):
        raise CheckpointError(f'{tokenizer_path!r} is not the tokenizer whose codes {gen_path!r} was trained on')
    return generator, tokenizer, info


def read_training_info(mllm_dir: str) -> dict:
    """The ``training.json`` beside a trained MLLM ({} when absent)."""
    path = os.path.join(mllm_dir, TRAINING_INFO)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise MLLMEvalError(f'cannot read {path}: {e}') from None


def same_dataset(spec_a: str, spec_b: str) -> bool:
    a, b = spec_a.split(':'), spec_b.split(':')
    if a[0] == 'builtin' and b[0] == 'builtin':
        return a[1:2] == b[1:2]
    return os.path.abspath(spec_a.removeprefix('folder:')) == os.path.abspath(spec_b.removeprefix('folder:'))


def code_dataset(codes, label_set, what):
    from ..generation.codes import CodeDataset
    if isinstance(codes, CodeDataset):
        if label_set is not None and codes.classnames != codes.label_sets.get(label_set):
            return CodeDataset(codes.directory, view=0, label=label_set)
        return codes if codes.view == 0 else CodeDataset(codes.directory, view=0, label=label_set)
    if not isinstance(codes, (str, os.PathLike)):
        raise MLLMEvalError(f'{what} codes must be an export directory or a CodeDataset, got {type(codes).__name__}')
    try:
        return CodeDataset(os.fspath(codes), view=0, label=label_set)
    except ValueError as e:
        raise MLLMEvalError(f'{what} codes: {e}') from None


def labelled_items(ds, model, what: str) -> list[dict]:
    """Labelled items of a code dataset: codes (K, h, w), label, name, source index."""
    from ..train.tasks.mllm import item_name
    c = model.config
    ds.check_tokenizer(model.image_tokenizer)
    ds.expect(c.num_codebooks, c.codebook_size, c.grid, what='this MLLM')
    if not ds.classnames:
        raise MLLMEvalError(f'the {what} codes in {ds.directory!r} have no class labels: export labelled data '
                            '(builtin:NAME or a folder with class sub-folders)')
    items = []
    for i in range(len(ds)):
        it = ds[i]
        if it['label'] >= 0:
            items.append(dict(codes=it['codes'], label=it['label'], name=item_name(ds.captions(i)),
                              index=it['index'], key=ds.key(i)))
    if not items:
        raise MLLMEvalError(f'the {what} codes in {ds.directory!r} hold no labelled item (empty split?)')
    return items


def open_images(ds, what: str):
    data = ds.manifest['data']
    if data.get('kind') != 'map':
        raise MLLMEvalError(f'the {what} codes in {ds.directory!r} come from streamed shards: pass the images '
                            '(a map-style source) explicitly')
    return open_source(data['spec'], data['split'], resampled=False)
