"""Reading pickled checkpoints without running their code.

The official UniTok release is a pickle ``{'args': {...}, 'trainer': {'unitok': state_dict, ...}}``.
It is read with ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain
containers: a file that tries to run code is refused before anything runs, and the error names the
globals it would have called (found by reading the opcodes with :mod:`pickletools`, never by importing).
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Mapping

import torch

from .config import ConfigError, UniTokConfig
from .pretrained import CheckpointError

_MODULE_ALIASES = {'posix': 'os', 'nt': 'os', '__builtin__': 'builtins'}


def read_official_checkpoint(path: str, map_location: str | torch.device = 'cpu') -> tuple[UniTokConfig, dict]:
    """Read an official release file safely: its config and the UniTok state dict (official key names)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'no checkpoint file at {path!r}')
    ckpt = safe_load(path, map_location)
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


def read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state dict in the file at ``path`` (``what`` names it in errors), read safely;
    a file holding anything else is a CheckpointError."""
    state = safe_load(path)
    state = state.get('state_dict', state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f'{what} {path!r}: expected a state dict {{name: tensor}}, got '
                              f'{"an empty one" if isinstance(state, Mapping) else type(state).__name__}')
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'{what} {path!r}: non-tensor entries in the state dict: {bad[:5]}')
    return dict(state)


def safe_load(path: str, map_location: str | torch.device = 'cpu'):
    """``torch.load(path, weights_only=True)`` (memory-mapped for torch's zip format); an unsafe or
    unreadable file raises :class:`CheckpointError` saying why."""
    try:
        with warnings.catch_warnings():      # torch warns about pickle protocols > 2 before refusing them
            warnings.filterwarnings('ignore', message='.*pickle protocol', category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(unsafe_pickle_message(path, e)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f'cannot read checkpoint {path!r}: {type(e).__name__}: {e}') from None


def unsafe_pickle_message(path: str, error: Exception) -> str:
    """Say which globals made ``torch.load(weights_only=True)`` refuse ``path`` (torch's own message
    advises ``weights_only=False``, which is exactly what must not be done with an unknown file)."""
    blocked = [g for g in pickle_globals(path)
               if not g.startswith('torch.') and g not in ('collections.OrderedDict', '_codecs.encode')]
    if not blocked:
        blocked = [_canonical(g) for g in re.findall(r'GLOBAL ([\w.]+)', str(error))]
    if blocked:
        shown = ', '.join(blocked[:5]) + (f' (+{len(blocked) - 5} more)' if len(blocked) > 5 else '')
        what = f'unpickling it would import and call {shown}, which can run arbitrary code'
    else:
        reason = re.sub(r'\x1b\[[0-9;]*m', '', str(error)).split('WeightsUnpickler error:')[-1]
        reason = ' '.join(reason.split('Check the documentation')[0].split())[:200]
        what = f'it uses pickle features outside the safe subset ({reason})'
    return (f'refused to load {path!r}: the file is unsafe: {what}. Only tensors and plain containers '
            f'are accepted. Nothing from the file was executed.')


def pickle_globals(path: str) -> list[str]:
    """The ``module.name`` globals a pickle file (plain or torch zip) references, read with
    :mod:`pickletools` opcode by opcode: nothing is imported or called."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith('data.pkl')), None)
                data = z.read(member) if member else b''
        else:
            with open(path, 'rb') as f:
                data = f.read()
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found, strings, memo, top = [], [], {}, None
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ('GLOBAL', 'INST'):                      # arg: 'module name'
                found.append(arg.replace(' ', '.'))
            elif op.name == 'STACK_GLOBAL' and len(strings) >= 2:  # module and name pushed before it
                found.append(f'{strings[-2]}.{strings[-1]}')
            if isinstance(arg, str) and op.name.endswith(('UNICODE', 'STRING')):
                top = arg
                strings.append(arg)
            elif op.name == 'MEMOIZE':
                memo[len(memo)] = top
            elif op.name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
                memo[arg] = top
            elif op.name in ('GET', 'BINGET', 'LONG_BINGET'):
                top = memo.get(arg)
                if isinstance(top, str):
                    strings.append(top)
            else:
                top = None
    except Exception:   # truncated or corrupt stream: report what was read
        pass
    return list(dict.fromkeys(_canonical(g) for g in found))


def _canonical(name: str) -> str:
    module, _, attr = name.rpartition('.')
    return f'{_MODULE_ALIASES.get(module, module)}.{attr}' if module else name


def _is_zip(path: str) -> bool:
    with open(path, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'
