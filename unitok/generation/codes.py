"""Exported codes: a data source tokenized once into memory-mapped ``uint16`` shards, and the dataset
that reads them back for training a generator.

Layout of an export directory (no pickle anywhere; ``P`` = ``UUUUU-CCCCC``, unit and chunk)::

    manifest.json          what the codes mean (see below); "complete": false while an export runs
    codes-P.npy            uint16 (n, A, K, h, w): n images, A views, K sub-codebooks, h x w grid
    labels-P.npy           int64 (n, S): one column per label set of the manifest (-1: unlabelled)
    index-P.npy            int64 (n,): the item's index in the source (map-style) or position in its tar
    meta-P.jsonl           one line per image: {"key": source key, "captions": [caption, ...]}
    done-P.json            written last: the shard is finished (count, skipped images)

Work is split into shards that do not depend on the number of processes: for map-style sources
(built-in, folder) shard ``00000-C`` holds items ``[C * shard_size, (C + 1) * shard_size)``; for
webdataset shards unit ``U`` is the U-th tar file and chunk ``C`` its samples at positions
``[C * shard_size, ...)``. Under ``torchrun`` shard (or tar) ``s`` goes to rank ``s % world_size``,
so 2 processes write exactly the files 1 process writes. Every file is written atomically and
``done-P.json`` last, so after an interruption a rerun keeps the finished shards and does the rest.

Views (``A``): view 0 is always the evaluation transform (shorter side resized to the tokenizer's
image size, bicubic, centre crop); ``flip`` adds its mirror image; ``tencrop`` adds torchvision's
ten crops of the image resized to 1.1x the size (as LlamaGen's code extraction does): the four
corners and centre, then the same five of the mirrored image. ``manifest["views"]`` names them in order.

The codes of a batch are exactly what :meth:`UniTok.encode` returns for the views of ``batch_size``
images stacked in order. Near-ties of the nearest-code search can flip with the float summation
order (batch composition, thread count), so a resumed export should keep ``batch_size`` and the
thread count to give byte-identical files; a different batch size gives equally valid codes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..config import UniTokConfig
from ..images import ImageReadError
from ..precision import check_precision, precision_of
from ..utils import distributed as D
from ..utils.io import atomic_write, check_writable_dir
from ..utils.throughput import Throughput, ThroughputMeter

log = logging.getLogger(__name__)

FORMAT = 'unitok-codes'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
AUGMENTATIONS = ('none', 'flip', 'tencrop')
TENCROP_SCALE = 1.1
# Fields that change training, not what a code means or how it decodes: left out of the config hash.
TRAINING_ONLY_FIELDS = ('grad_checkpointing', 'drop_path', 'commitment_beta', 'entropy_loss', 'entropy_temperature')
_TENCROP_NAMES = ('tl', 'tr', 'bl', 'br', 'center')
# Manifest fields that a resumed export may change (the tool version: a newer unitok may finish an export).
_PROGRESS_FIELDS = ('tool', 'complete', 'num_items', 'shards', 'skipped')
_SHARD_RE = re.compile(r'^done-(\d{5})-(\d{5})\.json$')


class CodeFormatError(ValueError):
    """Exported codes are missing, incomplete, malformed, or do not fit the tokenizer / model at hand."""


# ---------------------------------------------------------------------- tokenizer identity
def config_hash(config: UniTokConfig) -> str:
    """sha256 of the canonical JSON of the fields of ``config`` that decide what codes mean."""
    return hashlib.sha256(json.dumps(_hashed_fields(config), sort_keys=True).encode()).hexdigest()


def _hashed_fields(config: UniTokConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in TRAINING_ONLY_FIELDS}


def codebook_hash(model) -> str:
    """sha256 of the tokenizer's codebooks (float32 bytes): codes index into exactly these vectors."""
    table = model.quantizer.codebook.detach().to('cpu', torch.float32).contiguous()
    return hashlib.sha256(table.numpy().tobytes()).hexdigest()


def tokenizer_identity(model_or_config) -> dict:
    """What exported codes record about their tokenizer; ``codebook_sha256`` is None for a bare config."""
    config = model_or_config if isinstance(model_or_config, UniTokConfig) else model_or_config.config
    g = config.grid_size
    return dict(config_sha256=config_hash(config),
                codebook_sha256=None if isinstance(model_or_config, UniTokConfig) else codebook_hash(model_or_config),
                num_codebooks=config.num_codebooks, codebook_size=config.codebook_size, grid=[g, g],
                image_size=config.image_size)


# ---------------------------------------------------------------------- views
def parse_augment(augment: str | Sequence[str] | None) -> tuple[str, ...]:
    """``'flip,tencrop'`` (or a sequence) -> the extra views after view 0, validated; ``'none'`` adds nothing."""
    if augment is None:
        return ()
    names = [a.strip() for a in (augment.split(',') if isinstance(augment, str) else augment) if a.strip()]
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f'unknown augmentation(s) {unknown}; choose from {list(AUGMENTATIONS)} (comma-separated)')
    extras = [a for a in names if a != 'none']
    if len(set(extras)) != len(extras):
        raise ValueError(f'augmentation listed twice in {names}')
    return tuple(a for a in AUGMENTATIONS if a in extras)      # canonical order


def view_names(augment: Sequence[str]) -> list[str]:
    names = ['center']
    if 'flip' in augment:
        names.append('center-flip')
    if 'tencrop' in augment:
        names += [f'tencrop-{c}' for c in _TENCROP_NAMES] + [f'tencrop-flip-{c}' for c in _TENCROP_NAMES]
    return names


class ViewTransform:
    """PIL image -> ``(A, 3, size, size)`` float tensor in [-1, 1], the views of :func:`view_names`."""

    def __init__(self, size: int, augment: Sequence[str] = ()):
        from torchvision import transforms as T

        from ..data import eval_transform
        self.size, self.augment = size, tuple(augment)
        self.center = eval_transform(size)
        big = int(round(size * TENCROP_SCALE))
        bicubic = T.InterpolationMode.BICUBIC
        self.tencrop = T.Compose([T.Resize(big, interpolation=bicubic, antialias=True), T.CenterCrop(big),
                                  T.TenCrop(size)])
        self.to_tensor = T.ToTensor()

    def __call__(self, image) -> torch.Tensor:
        center = self.center(image)                                # (3, size, size)
        views = [center]
        if 'flip' in self.augment:
            views.append(center.flip(-1))
        if 'tencrop' in self.augment:
            views += [self.to_tensor(c).mul(2.0).sub(1.0) for c in self.tencrop(image)]
        return torch.stack(views)                                  # (A, 3, size, size)


# ---------------------------------------------------------------------- export
@dataclass
class ExportConfig:
    """What to export. ``data``/``split``/``augment``/``precision``/``shard_size``/``limit`` decide the
    codes (a rerun into the same directory must repeat them); the rest only how fast they come."""
    data: str                                # data spec, see unitok.data.open_source
    split: str = 'train'
    augment: tuple[str, ...] = ()            # extra views after the centre crop: 'flip', 'tencrop'
    precision: str = 'fp32'                  # a name of unitok.precision.INFERENCE_PRECISIONS (see export_codes)
    shard_size: int = 1024                   # images per shard
    limit: int | None = None                 # the first N items only (map-style sources)
    batch_size: int = 32                     # images per encoder call (each with its A views)
    workers: int = 0                         # DataLoader worker processes decoding images (0: this process)

    def __post_init__(self):
        self.augment = parse_augment(self.augment)
        check_precision(self.precision)
        for name in ('shard_size', 'batch_size'):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f'{name} must be a positive integer, got {v!r}')
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f'limit must be a positive integer or None, got {self.limit!r}')
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f'workers must be a non-negative integer, got {self.workers!r}')


@dataclass
class ExportResult:
    manifest: dict
    images: int = 0              # images encoded by this process in this call (finished shards not counted)
    skipped: list = field(default_factory=list)   # this call's skipped images on this process
    throughput: Throughput = field(default_factory=Throughput)   # encoder vs loader-wait time of this process

    @property
    def seconds(self) -> float:
        return self.throughput.wall

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _label_sets(source, spec: str, split: str) -> list[tuple[str, list[str], list[int] | None]]:
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


def _identity(model, cfg: ExportConfig, source, label_sets) -> dict:
    """The manifest without its shard list: everything a rerun into the same directory must repeat."""
    from .. import __version__
    tok = tokenizer_identity(model)
    tok['config'] = _hashed_fields(model.config)
    streamed = not hasattr(source, 'read')
    return dict(
        format=FORMAT, version=FORMAT_VERSION, tool=f'unitok {__version__}',
        tokenizer=tok, dtype='uint16', layout=['N', 'A', 'K', 'h', 'w'],
        data=dict(spec=cfg.data, split=cfg.split, limit=cfg.limit, kind='webdataset' if streamed else 'map',
                  items=None if streamed else _num_items(source, cfg), tars=list(source.urls) if streamed else None),
        augment=list(cfg.augment), views=view_names(cfg.augment), num_views=len(view_names(cfg.augment)),
        precision=cfg.precision, shard_size=cfg.shard_size,
        label_sets=[dict(name=n, classnames=c) for n, c, _ in label_sets],
    )


def _num_items(source, cfg: ExportConfig) -> int:
    return len(source) if cfg.limit is None else min(cfg.limit, len(source))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CodeFormatError(f'cannot read {path!r}: {e}') from None


def _write_json(path: str, obj: dict, what: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False) + '\n'), mode='w', what=what)


def _prepare_dir(out: str, identity: dict) -> None:
    """Refuse a directory holding something else; write the (incomplete) manifest of a fresh export."""
    path = os.path.join(out, MANIFEST)
    if os.path.isfile(path):
        old = _read_json(path)
        old_id = {k: v for k, v in old.items() if k not in _PROGRESS_FIELDS}
        new_id = {k: v for k, v in identity.items() if k not in _PROGRESS_FIELDS}
        if old_id != new_id:
            diffs = _differences(old_id, new_id)
            raise CodeFormatError(f'{out!r} holds codes of a different export ({"; ".join(diffs)}); '
                                  f'rerun with the same options to resume it, or pick another --out')
        return
    if os.path.isdir(out) and os.listdir(out):
        raise CodeFormatError(f'{out!r} is not empty and holds no {MANIFEST}: refusing to write codes into it')
    _write_json(path, {**identity, 'complete': False, 'num_items': 0, 'shards': [], 'skipped': []}, 'manifest')


def _differences(a: dict, b: dict, prefix: str = '') -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f'{prefix}{k}.')
        elif x != y:
            out.append(f'{prefix}{k}: {_short(x)} there, {_short(y)} now')
    return out


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + '...'


def _shard_name(unit: int, chunk: int) -> str:
    return f'{unit:05d}-{chunk:05d}'


def _finished(out: str) -> dict[tuple[int, int], dict]:
    done = {}
    for name in os.listdir(out) if os.path.isdir(out) else ():
        m = _SHARD_RE.match(name)
        if m:
            done[(int(m.group(1)), int(m.group(2)))] = _read_json(os.path.join(out, name))
    return done


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


def _map_batches(source, cfg: ExportConfig, views, label_sets, shards: list[int]):
    """(shard, batch of item results, last batch of the shard?) for map-style sources."""
    n = _num_items(source, cfg)
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


def _stream_plan(source, cfg: ExportConfig, tars: list[int], done):
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

    def __init__(self, source, cfg: ExportConfig, views, tars: list[int], done):
        self.source, self.cfg, self.views, self.tars, self.done = source, cfg, views, tars, done

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, (shard, batch, last, end_of_tar) in enumerate(_stream_plan(self.source, self.cfg, self.tars, self.done)):
            if k % workers == worker:
                yield shard, _decode_raw(self.source, self.views, batch), last, end_of_tar


def _as_is(item):
    return item


def _stream_batches(source, cfg: ExportConfig, views, tars: list[int], done):
    """(shard, batch of item results, last batch of the shard?, end of tar?) for webdataset shards,
    decoded in ``cfg.workers`` loader processes."""
    from ..data.stream import _worker_init
    yield from torch.utils.data.DataLoader(_StreamItems(source, cfg, views, tars, done), batch_size=None,
                                           num_workers=cfg.workers, collate_fn=_as_is,
                                           worker_init_fn=_worker_init if cfg.workers else None)


def export_codes(model, cfg: ExportConfig, out: str, progress: bool = False) -> ExportResult:
    """Tokenize ``cfg.data`` with ``model`` (a :class:`~unitok.UniTok`) into ``out`` (see the module docstring).

    Call it on every rank under ``torchrun`` (the process group already initialised); each rank
    encodes its share of the shards, rank 0 writes the final manifest. Reruns resume.
    Returns this process's result, with the final manifest on every rank.

    ``cfg.precision`` is recorded in the manifest and must be the model's own setting
    (:func:`unitok.precision.precision_of`), except that ``'bf16'`` also takes a float32 model, whose encoder
    then runs under bf16 autocast.
    """
    from ..data import open_source
    if model.config.num_query:
        raise CodeFormatError(f'export-codes needs a tokenizer without query tokens (its codes are an h x w grid); '
                              f'this one has num_query={model.config.num_query}')
    if model.config.codebook_size > 1 << 16:
        raise CodeFormatError(f'codes are stored as uint16, which holds codebooks of at most 65536 codes; '
                              f'this tokenizer has codebook_size={model.config.codebook_size}')
    have = precision_of(model)
    if have != cfg.precision and not (cfg.precision == 'bf16' and have == 'fp32'):
        raise ValueError(f'export precision {cfg.precision!r} needs a model in that setting: UniTok.from_pretrained('
                         f'path, **unitok.precision.INFERENCE_PRECISIONS[{cfg.precision!r}]); this model is in '
                         + (repr(have) if have else f'a setting without a name ({model.dtype})'))
    autocast = cfg.precision == 'bf16' and have == 'fp32'
    rank, world = D.rank_and_world()
    source = open_source(cfg.data, split=cfg.split, resampled=False)
    streamed = not hasattr(source, 'read')
    if streamed and cfg.limit is not None:
        raise ValueError('limit applies to map-style sources (builtin, folder); for webdataset shards select '
                         'fewer tar files with the brace pattern')
    label_sets = _label_sets(source, cfg.data, cfg.split)
    identity = _identity(model, cfg, source, label_sets)

    error = None
    if rank == 0:
        try:
            check_writable_dir(out, 'codes directory')
            _prepare_dir(out, identity)
        except (CodeFormatError, OSError) as e:
            error = e
    message = D.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:                       # the other ranks fail with rank 0's message
        raise CodeFormatError(message)

    done = _finished(out)
    if streamed:
        finished_tars = {t for (t, _), rec in done.items() if rec.get('last')}
        units = [t for t in range(len(source.urls)) if t % world == rank and t not in finished_tars]
        batches = _stream_batches(source, cfg, ViewTransform(model.config.image_size, cfg.augment), units, done)
        total = None
    else:
        n = _num_items(source, cfg)
        shards = [c for c in range(math.ceil(n / cfg.shard_size)) if c % world == rank and (0, c) not in done]
        batches = _map_batches(source, cfg, ViewTransform(model.config.image_size, cfg.augment), label_sets, shards)
        total = sum(min(cfg.shard_size, n - c * cfg.shard_size) for c in shards)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc='export-codes', unit='img', disable=not sys.stderr.isatty(), dynamic_ncols=True)
    device, was_training = model.device, model.training
    model.eval()
    meter, encoded, skipped_now = ThroughputMeter(), 0, []
    rows: list[tuple] = []
    skipped: list[dict] = []
    positions: list[int] = []
    try:
        for shard, batch, last, end_of_tar in meter.wait(batches):
            ok = [b for b in batch if b[0] == 'ok']
            for b in batch:
                positions.append(b[1])
                if b[0] == 'error':
                    skipped.append(dict(index=b[1], key=b[2], reason=b[3]))
                    log.warning('skipped %s: %s', b[2], b[3])
            if ok:
                with meter.model(len(ok)):
                    x = torch.cat([b[3] for b in ok]).to(device)       # (n * A, 3, S, S)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        codes = model.encode(x)                         # (n * A, K, h, w)
                    codes = codes.view(len(ok), -1, *codes.shape[1:]).cpu().numpy().astype(np.uint16)  # (n, A, K, h, w)
                rows += [(b[1], b[2], b[4], b[5], c) for b, c in zip(ok, codes)]
            if bar is not None:
                bar.update(len(batch))
            if last:
                _write_shard(out, shard, rows, skipped, positions, len(label_sets), cfg, identity,
                             last=end_of_tar)
                encoded += len(rows)
                skipped_now += skipped
                rows, skipped, positions = [], [], []
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    speed = meter.result()

    D.barrier()
    manifest = error = None
    if rank == 0:
        try:
            manifest = _finish_manifest(out, identity, source, cfg)
        except (CodeFormatError, OSError) as e:
            error = e
    manifest, message = D.broadcast_object((manifest, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise CodeFormatError(message)
    return ExportResult(manifest=manifest, images=encoded, skipped=skipped_now, throughput=speed)


def _write_shard(out, shard, rows, skipped, positions, num_labels, cfg, identity, last) -> None:
    name = _shard_name(*shard)
    tok = identity['tokenizer']
    h, w = tok['grid']
    shape = (len(rows), identity['num_views'], tok['num_codebooks'], h, w)
    codes = np.stack([r[4] for r in rows]) if rows else np.zeros(shape, np.uint16)
    if codes.shape != shape:
        raise CodeFormatError(f'shard {name}: codes of shape {codes.shape}, expected {shape}')
    labels = np.asarray([r[3] for r in rows], dtype=np.int64).reshape(len(rows), num_labels)
    index = np.asarray([r[0] for r in rows], dtype=np.int64)
    meta = ''.join(json.dumps(dict(key=r[1], captions=r[2]), ensure_ascii=False) + '\n' for r in rows)

    def save(array):
        return lambda f: np.save(f, array, allow_pickle=False)
    atomic_write(os.path.join(out, f'codes-{name}.npy'), save(codes), what='codes shard')
    atomic_write(os.path.join(out, f'labels-{name}.npy'), save(labels), what='labels shard')
    atomic_write(os.path.join(out, f'index-{name}.npy'), save(index), what='index shard')
    atomic_write(os.path.join(out, f'meta-{name}.jsonl'), lambda f: f.write(meta), mode='w', what='captions shard')
    consumed = [min(positions), max(positions) + 1] if positions else [0, 0]
    _write_json(os.path.join(out, f'done-{name}.json'),
                dict(count=len(rows), positions=consumed, last=bool(last), skipped=skipped), 'shard record')


def _finish_manifest(out: str, identity: dict, source, cfg: ExportConfig) -> dict:
    done = _finished(out)
    if identity['data']['kind'] == 'map':
        n = identity['data']['items']
        expected = [(0, c) for c in range(math.ceil(n / cfg.shard_size))]
    else:
        expected = []
        for t in range(len(source.urls)):
            c = 0
            while (t, c) in done and not done[(t, c)].get('last'):
                c += 1
            expected += [(t, k) for k in range(c + 1)]
    missing = [_shard_name(*s) for s in expected if s not in done]
    if missing:
        raise CodeFormatError(f'export into {out!r} is missing {len(missing)} shard(s), e.g. {missing[0]}; '
                              f'rerun the same command to finish it')
    shards = [dict(name=_shard_name(*s), count=done[s]['count']) for s in expected]
    skipped = [dict(shard=_shard_name(*s), **k) for s in expected for k in done[s]['skipped']]
    manifest = {**identity, 'complete': True, 'num_items': sum(s['count'] for s in shards), 'shards': shards,
                'skipped': skipped}
    _write_json(os.path.join(out, MANIFEST), manifest, 'manifest')
    return manifest


# ---------------------------------------------------------------------- reading
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
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            raise CodeFormatError(f'{directory!r} holds no exported codes ({MANIFEST} missing); '
                                  f'create them with: unitok export-codes --model TOKENIZER --data SPEC --out {directory}')
        m = _read_json(path)
        if m.get('format') != FORMAT or m.get('version') != FORMAT_VERSION:
            raise CodeFormatError(f'{path!r} is not a {FORMAT} v{FORMAT_VERSION} manifest '
                                  f'(format {m.get("format")!r}, version {m.get("version")!r})')
        if not m.get('complete'):
            raise CodeFormatError(f'the export in {directory!r} is incomplete (interrupted?); rerun the same '
                                  f'unitok export-codes command to finish it')
        self.manifest = m
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
        for s in range(len(self.shard_names)):      # open every shard once: a bad file fails here, not mid-training
            self._open(s)

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
        """Raise one :class:`CodeFormatError` listing every way these codes do not fit ``what``."""
        problems = []
        if num_codebooks is not None and num_codebooks != self.num_codebooks:
            problems.append(f'{self.num_codebooks} sub-codebooks here, {num_codebooks} expected')
        if codebook_size is not None and codebook_size != self.codebook_size:
            problems.append(f'{self.codebook_size} codes per sub-codebook here, {codebook_size} expected')
        if grid is not None and tuple(grid) != self.grid:
            problems.append(f'grid {self.grid[0]}x{self.grid[1]} here, {grid[0]}x{grid[1]} expected')
        if problems:
            raise CodeFormatError(f'codes in {self.directory!r} do not fit {what}: ' + '; '.join(problems))

    def check_tokenizer(self, model_or_config) -> None:
        """Raise one :class:`CodeFormatError` unless these codes were exported by this tokenizer (config
        hash, K, codebook size, grid; with a model also its codebooks)."""
        theirs, mine = self.manifest['tokenizer'], tokenizer_identity(model_or_config)
        problems = []
        for k, what in (('num_codebooks', 'sub-codebooks'), ('codebook_size', 'codes per sub-codebook'),
                        ('grid', 'grid'), ('config_sha256', 'config sha256'), ('codebook_sha256', 'codebook sha256')):
            if mine[k] is not None and theirs[k] != mine[k]:
                a, b = (f'{x[0]}x{x[1]}' if k == 'grid' else str(x)[:12] if 'sha' in k else x
                        for x in (theirs[k], mine[k]))
                problems.append(f'{what} {a} there, {b} in this tokenizer')
        if problems:
            raise CodeFormatError(f'codes in {self.directory!r} were exported by another tokenizer ('
                                  + '; '.join(problems) + '); export them again with this one')

    # -- access
    def _open(self, s: int) -> tuple:
        if s not in self._arrays:
            name = self.shard_names[s]
            n = int(self._starts[s + 1] - self._starts[s])
            h, w = self.grid
            want = {'codes': ((n, self.num_views, self.num_codebooks, h, w), np.uint16),
                    'labels': ((n, len(self.manifest['label_sets'])), np.int64), 'index': ((n,), np.int64)}
            arrays = []
            for part, (shape, dtype) in want.items():
                path = os.path.join(self.directory, f'{part}-{name}.npy')
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

    def _captions(self, s: int) -> list:
        if s not in self._meta:
            path = os.path.join(self.directory, f'meta-{self.shard_names[s]}.jsonl')
            try:
                with open(path, encoding='utf-8') as f:
                    rows = [json.loads(line) for line in f if line.strip()]
            except (OSError, json.JSONDecodeError) as e:
                raise CodeFormatError(f'cannot read {path!r}: {e}') from None
            if len(rows) != self._starts[s + 1] - self._starts[s]:
                raise CodeFormatError(f'{path!r} has {len(rows)} rows, the manifest says '
                                      f'{self._starts[s + 1] - self._starts[s]}')
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

