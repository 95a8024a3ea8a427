"""Saving and loading UniTok weights, safely.

* Our format: a directory with ``config.json`` (:class:`UniTokConfig`) and ``model.safetensors``.
* The official release: a pickle ``{'args': {...}, 'trainer': {'unitok': state_dict, ...}}``. It is
  read with ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain
  containers: a file that tries to run code is refused before anything runs.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, UniTokConfig
from .model import UniTok
from .quantizer import to_official_layout
from .utils.io import atomic_write

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unsafe, malformed or does not match the model."""


# ---------------------------------------------------------------------- our format
def save_pretrained(model: UniTok, directory: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` (float tensors as stored, contiguous copies)."""
    model = getattr(model, '_orig_mod', model)          # torch.compile wrapper
    model = getattr(model, 'module', model)             # DDP wrapper
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {'format': 'unitok', 'config': model.config.to_json()}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(state, p, metadata=meta), mode='path')
    atomic_write(os.path.join(directory, CONFIG_NAME), lambda f: f.write(model.config.to_json() + '\n'), mode='w')


def load_pretrained(path_or_hub_id: str, map_location: str | torch.device = 'cpu') -> UniTok:
    """Load a model from a directory, a Hugging Face hub id, or an official ``.pth`` release file."""
    path = os.fspath(path_or_hub_id)
    if os.path.isfile(path):
        if path.endswith('.safetensors'):
            return _load_dir(os.path.dirname(os.path.abspath(path)), map_location)
        return load_official_checkpoint(path, map_location=map_location)
    if os.path.isdir(path):
        return _load_dir(path, map_location)
    if path.count('/') == 1 and not path.startswith(('.', '/')):
        return _load_dir(_download(path), map_location)
    raise CheckpointError(f'no model at {path!r}: not a file, not a directory, not a hub id (owner/name)')


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except Exception as e:  # offline, unknown repo, no access ...
        raise CheckpointError(f'could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). '
                              'Download it elsewhere and pass the local directory.') from None


def _load_dir(directory: str, map_location) -> UniTok:
    cfg_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    missing = [p for p in (cfg_path, weights_path) if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(f'{directory!r} is not a UniTok model directory: missing {", ".join(missing)}')
    try:
        config = UniTokConfig.from_json(cfg_path)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f'invalid {cfg_path}: {e}') from None
    try:
        state = load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f'cannot read {weights_path}: {e}') from None
    return _build(config, state)


def _build(config: UniTokConfig, state: Mapping[str, torch.Tensor]) -> UniTok:
    # Build on the meta device (no random init, no second copy of the weights), then take the tensors.
    with torch.device('meta'):
        model = UniTok(config)
    check_keys(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    model.materialize_non_persistent_buffers()
    return model.eval()


def check_keys(model: UniTok, state: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming every missing and unexpected key or wrong shape
    (the official per-sub-codebook quantizer layout is accepted too)."""
    expected = model.state_dict()
    if not {'quantizer.codebook', 'quantizer.vocab_usage'} & set(state):
        expected = to_official_layout(expected)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        def fmt(keys):
            return ', '.join(keys[:12]) + (f' ... (+{len(keys) - 12} more)' if len(keys) > 12 else '') or 'none'
        raise CheckpointError(f'checkpoint does not match the model config: {len(missing)} missing key(s): '
                              f'{fmt(missing)}; {len(unexpected)} unexpected key(s): {fmt(unexpected)}')
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f'shape mismatch for {key}: checkpoint {tuple(state[key].shape)}, '
                                  f'model {tuple(value.shape)}')


# ---------------------------------------------------------------------- official release
def read_official_checkpoint(path: str, map_location: str | torch.device = 'cpu') -> tuple[UniTokConfig, dict]:
    """Read an official release file safely: its config and the UniTok state dict (official key names)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'no checkpoint file at {path!r}')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'refused to load {path!r}: it contains pickled objects other than tensors and plain containers '
            f'({str(e).splitlines()[0][:300]}). Nothing from the file was executed.') from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f'cannot read checkpoint {path!r}: {type(e).__name__}: {e}') from None
    if not isinstance(ckpt, Mapping) or 'args' not in ckpt or not isinstance(ckpt.get('trainer'), Mapping) \
            or not isinstance(ckpt['trainer'].get('unitok'), Mapping):
        keys = list(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path!r} is not an official UniTok checkpoint: expected {{'args': ..., "
                              f"'trainer': {{'unitok': state_dict}}}}, got {keys}")
    args = ckpt['args']
    if not isinstance(args, Mapping):
        raise CheckpointError(f"{path!r}: 'args' must be a dict, got {type(args).__name__}")
    try:
        config = UniTokConfig.from_official_args(args)
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f'{path!r}: unsupported official args: {e}') from None
    state = dict(ckpt['trainer']['unitok'])
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'{path!r}: non-tensor entries in the state dict: {bad[:5]}')
    return config, state


def load_official_checkpoint(path: str, map_location: str | torch.device = 'cpu') -> UniTok:
    """Build a :class:`UniTok` from an official release checkpoint (strict: every key must match)."""
    config, state = read_official_checkpoint(path, map_location)
    try:
        return _build(config, state)
    except CheckpointError as e:
        raise CheckpointError(f'{path!r}: {e}') from None


def official_state_dict(model: UniTok) -> dict[str, torch.Tensor]:
    """The model's state dict under the official key names (for tools built on the official code)."""
    return to_official_layout(model.state_dict())


def save_official_checkpoint(model: UniTok, path: str) -> None:
    """Write ``{'args': ..., 'trainer': {'unitok': state_dict}}`` as the official ``inference.py`` expects."""
    state = {k: v.detach().cpu().contiguous() for k, v in official_state_dict(model).items()}
    ckpt = {'args': model.config.to_official_args(), 'trainer': {'unitok': state}}
    atomic_write(path, lambda p: torch.save(ckpt, p), mode='path')


def _is_zip(path: str) -> bool:
    with open(path, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'


def config_of(directory: str) -> UniTokConfig:
    """Read only the config of a model directory."""
    with open(os.path.join(directory, CONFIG_NAME), encoding='utf-8') as f:
        return UniTokConfig.from_dict(json.load(f))
