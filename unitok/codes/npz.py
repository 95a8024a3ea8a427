"""The ``.npz`` codes file of ``unitok encode``: the codes of a set of images with their source names,
the writer's config and a digest of its codebooks; :func:`check_codes_match` refuses codes from
another code space."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..utils.io import atomic_write

# Fields of UniTokConfig that decide what a code id means; the decoder may differ (codebook digest decides).
CODE_FIELDS = ('num_codebooks', 'codebook_size', 'code_dim', 'num_query')


@dataclass
class CodesFile:
    """What :func:`read_codes_file` returns."""
    codes: torch.Tensor          # (N, K, h, w) or (N, K, L) int64
    files: list[str]             # source name of each entry
    config: dict | None          # UniTokConfig dict of the model that wrote the file (None: not stored)
    codebook_digest: str | None  # :func:`codebook_digest` of that model (None: not stored)


def codebook_digest(model) -> str:
    """Short fingerprint of a model's code vectors: equal digests mean code ids mean the same vectors."""
    table = model.quantizer.codebook.detach().float().cpu().contiguous().numpy()
    return hashlib.sha256(table.tobytes()).hexdigest()[:16]


def write_codes_file(path: str, model, codes: torch.Tensor, files: list[str], image_size: int,
                     skipped: list[str], precision: str) -> np.dtype:
    """Write ``codes`` (N, K, h, w) of ``files`` encoded by ``model`` to the ``.npz`` ``path`` at once (int16
    when the codebook fits, else int32); the dtype written."""
    dtype = np.int16 if model.config.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    payload = dict(codes=codes.numpy().astype(dtype), files=np.array(files), image_size=np.array(image_size),
                   config=np.array(model.config.to_json()), codebook_digest=np.array(codebook_digest(model)),
                   skipped=np.array(skipped, dtype=str), precision=np.array(precision))

    def write(f):
        np.savez_compressed(f, **payload)
    atomic_write(path, write, what='codes file')
    return dtype


def read_codes_file(path: str) -> CodesFile:
    """Codes, source names and the writer's config from an ``unitok encode`` file (or any .npz/.npy
    holding a ``codes`` array). Every unreadable, corrupt or malformed file raises one ``ValueError``
    naming it; pickled arrays are refused, never loaded."""
    if os.path.isdir(path):
        raise ValueError(f'{path!r} is a directory, not a codes file (.npz from unitok encode, or .npy)')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no codes file at {path!r}')
    with open(path, 'rb') as f:
        head = f.read(8)
    is_npy, is_zip = head.startswith(b'\x93NUMPY'), head[:4] in (b'PK\x03\x04', b'PK\x05\x06')
    if not (is_npy or is_zip):
        raise ValueError(f'{path!r} is not a codes file: neither a .npz (zip) archive nor a .npy array '
                         f'(it starts with {head!r})')
    config = digest = None
    try:
        if is_npy:
            codes, files = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as z:
                if 'codes' not in z.files:
                    raise ValueError(f'no "codes" array (arrays: {z.files})')
                codes = z['codes']
                files = [str(f) for f in np.atleast_1d(z['files'])] if 'files' in z.files else None
                config = str(z['config']) if 'config' in z.files else None
                digest = str(z['codebook_digest']) if 'codebook_digest' in z.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        why = 'it holds pickled (object) arrays, which are never loaded' if 'pickle' in str(e) else \
            f'the file is truncated or corrupt ({type(e).__name__}: {e})' if not isinstance(e, ValueError) or \
            isinstance(e, zipfile.BadZipFile) else str(e)
        raise ValueError(f'cannot read codes from {path!r}: {why}') from None
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f'codes in {path!r} must be integers, got {codes.dtype}')
    if codes.ndim not in (3, 4) or codes.shape[0] == 0:
        raise ValueError(f'codes in {path!r} must be an array (N, K, h, w) or (N, K, L) with N >= 1, '
                         f'got shape {codes.shape}')
    files = files or [f'{i:06d}' for i in range(codes.shape[0])]
    if len(files) != codes.shape[0]:
        raise ValueError(f'{path!r} names {len(files)} file(s) for {codes.shape[0]} code entries')
    if config is not None:
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path!r}: the stored model config is not valid JSON ({e})') from None
        if not isinstance(config, dict):
            raise ValueError(f'{path!r}: the stored model config is not a JSON object')
    return CodesFile(torch.from_numpy(codes.astype(np.int64)), files, config, digest)


def check_codes_match(path: str, data: CodesFile, model) -> None:
    """Refuse codes written by a model whose code space differs from ``model``'s (another
    configuration, or the same configuration with other codebooks)."""
    cfg = model.config.to_dict()
    if data.config is not None:
        diffs = [f'{k} {data.config[k]!r} in the file, {cfg[k]!r} in the model'
                 for k in CODE_FIELDS if k in data.config and data.config[k] != cfg[k]]
        if diffs:
            raise ValueError(f'{path!r} was encoded by a model with another configuration ({"; ".join(diffs)}); '
                             'decode it with that model, or pass --ignore-mismatch')
    if data.codebook_digest is not None and data.codebook_digest != codebook_digest(model):
        raise ValueError(f'{path!r} was encoded by a model with other codebooks (digest {data.codebook_digest}, '
                         f'this model {codebook_digest(model)}): the code ids would mean other vectors; decode '
                         'it with that model, or pass --ignore-mismatch')
    n = model.config.codebook_size
    bad = ((data.codes < 0) | (data.codes >= n)).flatten(1).any(1).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f'codes must lie in [0, {n}) for this model; entry {i} ({data.files[i]}) of {path!r} '
                         f'has values in [{int(data.codes[i].min())}, {int(data.codes[i].max())}] '
                         f'({len(bad)} bad entr{"y" if len(bad) == 1 else "ies"})')
