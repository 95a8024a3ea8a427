"""The ``.npz`` codes file of ``unitok encode``: the codes of a set of images with their source names
and the writer's :func:`~unitok.codes.format.tokenizer_identity` (JSON, key ``tokenizer``);
:func:`check_codes_match` refuses codes from another code space through the one agreement check.
Files written before the identity (a ``config`` and a 16-character ``codebook_digest``) are still read."""
from __future__ import annotations

import json
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..utils.io import atomic_write
from .format import check_agreement, check_code_range, legacy_codebook_sha256, tokenizer_identity

# Identity fields the decoding model may change: another decoder config, or another grid (any grid decodes).
DECODER_FIELDS = ('config_sha256', 'grid', 'image_size')
_FIX = 'decode it with that model, or pass --ignore-mismatch'


@dataclass
class CodesFile:
    """What :func:`read_codes_file` returns."""
    codes: torch.Tensor          # (N, K, h, w) or (N, K, L) int64
    files: list[str]             # source name of each entry
    config: dict | None          # UniTokConfig dict of the model that wrote the file (None: not stored)
    codebook_digest: str | None  # older files: :func:`codebook_digest` of that model (None: not stored)
    tokenizer: dict | None = None   # the writer's tokenizer identity (None: an older file, or none stored)

    def identity(self) -> dict:
        """What the file says about its tokenizer, as an identity: the stored one, else the fields an
        older file carries (K, codes per sub-code, the 16-character codebook digest)."""
        if self.tokenizer is not None:
            return self.tokenizer
        old = {k: self.config.get(k) for k in ('num_codebooks', 'codebook_size')} if self.config else {}
        return {**old, 'codebook_sha256': self.codebook_digest}


def codebook_digest(model) -> str | None:
    """The 16-character codebook digest of files written before the tokenizer identity."""
    digest = legacy_codebook_sha256(model)
    return None if digest is None else digest[:16]


def write_codes_file(path: str, model, codes: torch.Tensor, files: list[str], image_size: int,
                     skipped: list[str], precision: str) -> np.dtype:
    """Write ``codes`` (N, K, h, w) of ``files`` encoded by ``model`` to the ``.npz`` ``path`` at once (int16
    when the codebook fits, else int32); the dtype written."""
    identity = {**tokenizer_identity(model), 'grid': list(codes.shape[2:]), 'image_size': image_size}
    dtype = np.int16 if model.config.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    payload = dict(codes=codes.numpy().astype(dtype), files=np.array(files), image_size=np.array(image_size),
                   config=np.array(model.config.to_json()), tokenizer=np.array(json.dumps(identity)),
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
    config = digest = tokenizer = None
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
                tokenizer = str(z['tokenizer']) if 'tokenizer' in z.files else None
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
    config, tokenizer = _json_object(path, config, 'model config'), _json_object(path, tokenizer, 'tokenizer identity')
    return CodesFile(torch.from_numpy(codes.astype(np.int64)), files, config, digest, tokenizer)


def _json_object(path: str, text: str | None, what: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path!r}: the stored {what} is not valid JSON ({e})') from None
    if not isinstance(value, dict):
        raise ValueError(f'{path!r}: the stored {what} is not a JSON object')
    return value


def check_codes_match(path: str, data: CodesFile, model) -> None:
    """Refuse codes written by a model whose code space differs from ``model``'s (another
    configuration, or the same configuration with other codebooks), and codes out of its range. A file
    that records nothing of its tokenizer gets a warning naming the check skipped."""
    if data.tokenizer is None and data.config is None and data.codebook_digest is None:
        warnings.warn(f'the codes file {path!r} records no tokenizer identity: the check that its codes come '
                      'from this tokenizer is skipped (only their range is checked)', stacklevel=2)
    check_agreement(data.identity(), model, where=f'the codes file {path!r}', consumer='the model',
                    there='in the file', fix=_FIX, skip=DECODER_FIELDS, error=ValueError)
    check_code_range(data.codes, model.quantizer, repr(path), data.files)
