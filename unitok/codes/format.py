"""What codes mean: the identity of the tokenizer that wrote them, and the one check that a tokenizer
(or a model trained on its codes) and a set of codes agree.

The identity is a JSON-able dict: the sha256 of the config fields that decide what codes mean, the
code space (K sub-codes, their vocabulary sizes, the grid) and the quantizer's own
:meth:`~unitok.quantizers.Quantizer.identity` (its registry name and a digest of its code vectors).
Export manifests, ``unitok encode`` files, generator and MLLM checkpoints record it; every consumer
compares it with :func:`check_agreement`.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

from ..config import UniTokConfig

FORMAT = 'unitok-codes'         # the shard format of an export directory (see unitok.codes.export)
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'

# Fields that change training, not what a code means or how it decodes: left out of the config hash.
TRAINING_ONLY_FIELDS = ('grad_checkpointing', 'drop_path', 'commitment_beta', 'entropy_loss', 'entropy_temperature')

# Differences that follow from others (not named again): code tables of another shape differ too.
_IMPLIED_BY = {'vocab_sizes': {'num_codebooks', 'codebook_size'},
               'config_sha256': {'num_codebooks', 'codebook_size', 'grid'},
               'digest': {'quantizer', 'num_codebooks', 'codebook_size', 'vocab_sizes'},
               'codebook_sha256': {'num_codebooks', 'codebook_size'}}
# The compared fields in message order: (key, label, what a difference means).
_FIELDS = (('num_codebooks', 'num_codebooks', 'configuration'), ('codebook_size', 'codebook_size', 'configuration'),
           ('vocab_sizes', 'vocab_sizes', 'configuration'), ('grid', 'grid', 'configuration'),
           ('quantizer', 'quantizer', 'configuration'), ('config_sha256', 'config sha256', 'configuration'),
           ('digest', 'quantizer digest', 'codebooks'), ('codebook_sha256', 'codebook sha256', 'codebooks'))


class CodeFormatError(ValueError):
    """Codes are missing, incomplete, malformed, or do not fit the tokenizer / model at hand."""


def read_json(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CodeFormatError(f'cannot read {path!r}: {e}') from None


def read_manifest(directory: str) -> dict:
    """The manifest of a complete export in ``directory``; one :class:`CodeFormatError` otherwise."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CodeFormatError(f'{directory!r} holds no exported codes ({MANIFEST} missing); '
                              f'create them with: unitok export-codes --model TOKENIZER --data SPEC --out {directory}')
    m = read_json(path)
    if m.get('format') != FORMAT or m.get('version') != FORMAT_VERSION:
        raise CodeFormatError(f'{path!r} is not a {FORMAT} v{FORMAT_VERSION} manifest '
                              f'(format {m.get("format")!r}, version {m.get("version")!r})')
    if not m.get('complete'):
        raise CodeFormatError(f'the export in {directory!r} is incomplete (interrupted?); rerun the same '
                              f'unitok export-codes command to finish it')
    return m


def hashed_fields(config: UniTokConfig) -> dict:
    """The fields of ``config`` that decide what codes mean."""
    return {k: v for k, v in config.to_dict().items() if k not in TRAINING_ONLY_FIELDS}


def config_hash(config: UniTokConfig) -> str:
    """sha256 of the canonical JSON of :func:`hashed_fields`."""
    return hashlib.sha256(json.dumps(hashed_fields(config), sort_keys=True).encode()).hexdigest()


def tokenizer_identity(model_or_config) -> dict:
    """What codes record about their tokenizer. A bare config has no code vectors: its
    ``vocab_sizes`` and ``digest`` are None (compared as unknown)."""
    bare = isinstance(model_or_config, UniTokConfig)
    config = model_or_config if bare else model_or_config.config
    g = config.grid_size
    quantizer = {'quantizer': config.quantizer, 'vocab_sizes': None, 'digest': None} if bare else \
        model_or_config.quantizer.identity()
    return dict(config_sha256=config_hash(config), **quantizer, num_codebooks=config.num_codebooks,
                codebook_size=config.codebook_size, grid=[g, g], image_size=config.image_size)


def code_space(config) -> dict:
    """The part of an identity a model trained on codes fixes: K, codes per sub-code and the grid
    (of a :class:`~unitok.generation.GeneratorConfig` or :class:`~unitok.mllm.MLLMConfig`)."""
    return dict(num_codebooks=config.num_codebooks, codebook_size=config.codebook_size, grid=list(config.grid))


def legacy_codebook_sha256(model) -> str | None:
    """The codebook rule of files written before the quantizer identity: sha256 of the float32 bytes of
    the quantizer's ``codebook`` state entry (None for a quantizer without one)."""
    table = model.quantizer.state_dict().get('codebook')
    if table is None:
        return None
    return hashlib.sha256(table.detach().to('cpu').float().contiguous().numpy().tobytes()).hexdigest()


def _identity_for(theirs: dict, tokenizer, where: str) -> dict:
    """The identity of ``tokenizer``, with the legacy codebook sha256 when ``theirs`` carries only that."""
    mine = tokenizer_identity(tokenizer)
    if theirs.get('digest') is None and theirs.get('codebook_sha256') and mine['digest'] is not None:
        mine['codebook_sha256'] = legacy_codebook_sha256(tokenizer)
        if mine['codebook_sha256'] is None:
            warnings.warn(f'{where} records only a codebook sha256 (written before the quantizer identity), '
                          'which this quantizer cannot reproduce: the codebook check is skipped', stacklevel=3)
    return mine


def _show(key: str, value) -> str:
    if key == 'grid':
        return f'{value[0]}x{value[1]}'
    if key in ('digest', 'config_sha256', 'codebook_sha256'):
        return str(value)[:16]
    s = json.dumps(value)
    return s if len(s) <= 60 else s[:57] + '...'


def _differs(key: str, a, b) -> bool:
    if key == 'codebook_sha256':          # files of `unitok encode` kept the first 16 characters
        n = min(len(a), len(b))
        return a[:n] != b[:n]
    return list(a) != list(b) if key == 'grid' else a != b


def check_agreement(theirs: dict, mine, *, where: str, consumer: str, there: str = 'there', fix: str = '',
                    skip: tuple[str, ...] = (), error: type[Exception] = CodeFormatError) -> None:
    """Raise one ``error`` naming every field of the identity ``theirs`` (the codes' side) that differs
    from ``mine`` (an identity, or a tokenizer model / config whose identity is taken). Fields unknown
    on either side (absent or None) and those in ``skip`` are not compared.

    The message reads ``{where} does not fit {consumer}: another tokenizer, with another configuration
    (num_codebooks 8 {there}, 4 in {consumer}; ...); {fix}``; a difference that follows from one already
    named (the digest of code tables of another shape) is not named again."""
    if not isinstance(mine, dict):
        mine = _identity_for(theirs, mine, where)
    problems, kinds = [], []
    for key, label, kind in _FIELDS:
        a, b = theirs.get(key), mine.get(key)
        if key in skip or a is None or b is None or not _differs(key, a, b):
            continue
        if _IMPLIED_BY.get(key, set()) & {p[0] for p in problems}:
            continue
        problems.append((key, f'{label} {_show(key, a)} {there}, {_show(key, b)} in {consumer}'))
        kinds += [kind] if kind not in kinds else []
    if not problems:
        return
    what = ' and '.join('another configuration' if k == 'configuration' else 'other codebooks' for k in kinds)
    why = ': the code ids would mean other vectors' if kinds == ['codebooks'] else ''
    raise error(f'{where} does not fit {consumer}: another tokenizer, with {what} ('
                + '; '.join(p for _, p in problems) + f'){why}' + (f'; {fix}' if fix else ''))


def check_code_range(codes, quantizer, where: str, names=None) -> None:
    """The quantizer's range check of ``codes`` ``(N, K, ...)``, naming the first bad entry of ``where``."""
    flat = codes.flatten(2)
    if flat.shape[1] != quantizer.num_codebooks:
        return                            # a shape error, reported by the decoder with the expected shape
    try:
        quantizer.check_codes(flat)
    except ValueError as e:
        bad = [i for i in range(flat.shape[0]) if _out_of_range(quantizer, flat[i:i + 1])]
        i = bad[0] if bad else 0
        name = f' ({names[i]})' if names is not None else ''
        raise ValueError(f'{e} for this model; entry {i}{name} of {where} is out of range '
                         f'({len(bad)} bad entr{"y" if len(bad) == 1 else "ies"})') from None


def _out_of_range(quantizer, codes) -> bool:
    try:
        quantizer.check_codes(codes)
    except ValueError:
        return True
    return False
