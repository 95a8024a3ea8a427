"""Golden fixtures of the official UniTok (tests/fixtures/golden/*/README in shared/golden):
rebuild the fixture weights from the manifest by the documented fill rule and read the arrays."""
from __future__ import annotations

import hashlib
import json
import math
import os
import zlib

import numpy as np
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'golden')


def _fill(key: str, shape: tuple[int, ...], rule: str) -> torch.Tensor:
    if rule == 'zeros':
        return torch.zeros(shape)
    if rule.startswith('const:'):
        return torch.full(shape, float(rule.split(':', 1)[1]))
    # Drawn in float64 (identical on every CPU kernel), rounded to float32, one float32 op per step.
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    t = torch.randn(shape, generator=g, dtype=torch.float64).float()
    if rule == 'fanin':
        return t / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else shape[0])
    if rule == 'ones_plus':
        return t * 0.1 + 1.0
    if rule == 'small':
        return t * 0.02
    raise ValueError(f'unknown fill rule {rule!r} for {key}')


def state_dict(name: str) -> dict[str, torch.Tensor]:
    """The fixture's official state dict, in manifest order."""
    sd = {}
    with open(os.path.join(FIXTURES, name, 'manifest.tsv')) as f:
        assert f.readline().split() == ['key', 'shape', 'dtype', 'is_buffer', 'fill']
        for line in f:
            key, shape, _dtype, _buffer, rule = line.rstrip('\n').split('\t')
            sd[key] = _fill(key, tuple(int(s) for s in shape.split(',')) if shape else (), rule)
    return sd


def sha256_mismatches(name: str, sd: dict[str, torch.Tensor]) -> list[str]:
    with open(os.path.join(FIXTURES, name, 'manifest_sha256.tsv')) as f:
        f.readline()
        want = dict(line.rstrip('\n').split('\t') for line in f if line.strip())
    got = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in sd.items()}
    return sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))


def official_checkpoint(name: str) -> dict:
    with open(os.path.join(FIXTURES, name, 'official_args.json')) as f:
        args = json.load(f)
    args['dtype'] = torch.float32  # stored as the string 'torch.float32'
    return {'args': args, 'trainer': {'unitok': state_dict(name)}}


def arrays(name: str) -> dict[str, dict[str, np.ndarray]]:
    """{'inputs', 'outputs', 'intermediates'} -> name -> array, plus 'meta'."""
    d = os.path.join(FIXTURES, name)
    out = {}
    for group in ('inputs', 'outputs', 'intermediates'):
        with np.load(os.path.join(d, f'{group}.npz'), allow_pickle=False) as z:
            out[group] = {k: z[k] for k in z.files}
    with open(os.path.join(d, 'meta.json')) as f:
        out['meta'] = json.load(f)
    return out
