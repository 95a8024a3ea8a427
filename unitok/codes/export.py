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

import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ..precision import check_precision, precision_of
from ..utils import distributed as D
from ..utils.io import atomic_write, check_writable_dir
from ..utils.throughput import Throughput, ThroughputMeter
from .format import FORMAT, FORMAT_VERSION, MANIFEST, CodeFormatError, hashed_fields, read_json, tokenizer_identity
from .items import count_items, map_batches, read_label_sets, stream_batches
from .views import ViewTransform, parse_augment, view_names

log = logging.getLogger(__name__)

# Manifest fields that a resumed export may change (the tool version: a newer unitok may finish an export).
_PROGRESS_FIELDS = ('tool', 'complete', 'num_items', 'shards', 'skipped')
_SHARD_RE = re.compile(r'^done-(\d{5})-(\d{5})\.json$')


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



def _identity(model, cfg: ExportConfig, source, label_sets) -> dict:
    """The manifest without its shard list: everything a rerun into the same directory must repeat."""
    from .. import __version__
    tok = tokenizer_identity(model)
    tok['config'] = hashed_fields(model.config)
    streamed = not hasattr(source, 'read')
    return dict(
        format=FORMAT, version=FORMAT_VERSION, tool=f'unitok {__version__}',
        tokenizer=tok, dtype='uint16', layout=['N', 'A', 'K', 'h', 'w'],
        data=dict(spec=cfg.data, split=cfg.split, limit=cfg.limit, kind='webdataset' if streamed else 'map',
                  items=None if streamed else count_items(source, cfg), tars=list(source.urls) if streamed else None),
        augment=list(cfg.augment), views=view_names(cfg.augment), num_views=len(view_names(cfg.augment)),
        precision=cfg.precision, shard_size=cfg.shard_size,
        label_sets=[dict(name=n, classnames=c) for n, c, _ in label_sets],
    )




def _write_json(path: str, obj: dict, what: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False) + '\n'), mode='w', what=what)


def _prepare_dir(out: str, identity: dict) -> None:
    """Refuse a directory holding something else; write the (incomplete) manifest of a fresh export."""
    path = os.path.join(out, MANIFEST)
    if os.path.isfile(path):
        old = read_json(path)
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
            done[(int(m.group(1)), int(m.group(2)))] = read_json(os.path.join(out, name))
    return done



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
    autocast = _check_model(model, cfg)
    rank, world = D.rank_and_world()
    source = open_source(cfg.data, split=cfg.split, resampled=False)
    if not hasattr(source, 'read') and cfg.limit is not None:
        raise ValueError('limit applies to map-style sources (builtin, folder); for webdataset shards select '
                         'fewer tar files with the brace pattern')
    label_sets = read_label_sets(source, cfg.data, cfg.split)
    identity = _identity(model, cfg, source, label_sets)
    _on_rank0(lambda: (check_writable_dir(out, 'codes directory'), _prepare_dir(out, identity)))
    batches, total = _my_batches(model, cfg, source, label_sets, out, rank, world)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc='export-codes', unit='img', disable=not sys.stderr.isatty(), dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        encoded, skipped, speed = _encode(model, batches, autocast, bar,
                                          lambda *a: _write_shard(out, *a, len(label_sets), cfg, identity))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    D.barrier()
    manifest = _on_rank0(lambda: _finish_manifest(out, identity, source, cfg))
    return ExportResult(manifest=manifest, images=encoded, skipped=skipped, throughput=speed)


def _check_model(model, cfg: ExportConfig) -> bool:
    """Refuse a tokenizer whose codes the format cannot hold, or a precision it is not in; whether
    the encoder runs under bf16 autocast."""
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
    return cfg.precision == 'bf16' and have == 'fp32'


def _on_rank0(work):
    """Run ``work`` on rank 0 and give every rank its result; its error is raised on every rank."""
    result = error = None
    if D.rank_and_world()[0] == 0:
        try:
            result = work()
        except (CodeFormatError, OSError) as e:
            error = e
    result, message = D.broadcast_object((result, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:                       # the other ranks fail with rank 0's message
        raise CodeFormatError(message)
    return result


def _my_batches(model, cfg: ExportConfig, source, label_sets, out: str, rank: int, world: int):
    """This rank's batches of the unfinished shards, and their number of images (None: streamed)."""
    done = _finished(out)
    views = ViewTransform(model.config.image_size, cfg.augment)
    if not hasattr(source, 'read'):
        finished_tars = {t for (t, _), rec in done.items() if rec.get('last')}
        units = [t for t in range(len(source.urls)) if t % world == rank and t not in finished_tars]
        return stream_batches(source, cfg, views, units, done), None
    n = count_items(source, cfg)
    shards = [c for c in range(math.ceil(n / cfg.shard_size)) if c % world == rank and (0, c) not in done]
    total = sum(min(cfg.shard_size, n - c * cfg.shard_size) for c in shards)
    return map_batches(source, cfg, views, label_sets, shards), total


def _encode(model, batches, autocast: bool, bar, write_shard) -> tuple[int, list, Throughput]:
    """Encode every batch, writing each shard when its last batch is done; (images, skipped, speed)."""
    device, meter = model.device, ThroughputMeter()
    encoded, skipped_now, rows, skipped, positions = 0, [], [], [], []
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
            write_shard(shard, rows, skipped, positions, end_of_tar)
            encoded += len(rows)
            skipped_now += skipped
            rows, skipped, positions = [], [], []
    return encoded, skipped_now, meter.result()


def _write_shard(out, shard, rows, skipped, positions, last, num_labels, cfg, identity) -> None:
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
    if not sum(s['count'] for s in shards):          # an export of nothing is no export: never marked complete
        first = f'; the first: {skipped[0]["key"]} ({skipped[0]["reason"]})' if skipped else ''
        raise CodeFormatError(f'no readable image in {cfg.data!r} (split {cfg.split!r}): {len(skipped)} '
                              f'unreadable{first}; nothing was exported to {out!r}')
    manifest = {**identity, 'complete': True, 'num_items': sum(s['count'] for s in shards), 'shards': shards,
                'skipped': skipped}
    _write_json(os.path.join(out, MANIFEST), manifest, 'manifest')
    return manifest

