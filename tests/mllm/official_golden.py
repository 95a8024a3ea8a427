"""The tiny released-MLLM checkpoint of ``tests/fixtures/golden_mllm`` rebuilt in the official layout, and the
fixtures the official code produced from it (see that folder's README)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'golden_mllm')


def _script():
    path = os.path.join(ROOT, 'scripts', 'make_mllm_golden.py')
    spec = importlib.util.spec_from_file_location('make_mllm_golden', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def build_checkpoint(folder: str) -> str:
    """Write the official tiny checkpoint into ``folder``; every tensor's sha256 equals the official one."""
    from safetensors.torch import save_file
    fill = _script().fill
    with open(os.path.join(FIXTURES, 'checkpoint_manifest.json')) as f:
        manifest = json.load(f)
    shards: dict[str, dict] = {}
    for key, m in manifest.items():
        value = fill(key, m['shape'])
        if _sha(value) != m['sha256']:          # buffers keep their official zeros
            value = torch.zeros(m['shape'])
        assert _sha(value) == m['sha256'], key
        shards.setdefault(m['shard'], {})[key] = value
    os.makedirs(folder, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, os.path.join(folder, name), metadata={'format': 'pt'})
    ck = os.path.join(FIXTURES, 'checkpoint')
    for name in os.listdir(ck):
        shutil.copyfile(os.path.join(ck, name), os.path.join(folder, name))
    return folder


def golden() -> tuple[dict, dict]:
    """``(texts and ids, arrays)`` of the official run."""
    with open(os.path.join(FIXTURES, 'golden_mllm.json')) as f:
        meta = json.load(f)
    return meta, dict(np.load(os.path.join(FIXTURES, 'golden_mllm.npz')))
