"""Training checkpoints: atomic single-file writes, keep-last-k, ``latest`` lookup, RNG capture.

A checkpoint is one ``torch.save`` file of tensors and plain containers, read back with
``weights_only=True``. Written to a temporary file and renamed, it is either complete or absent.
"""
from __future__ import annotations

import errno
import glob
import logging
import os
import pickle
import random
import re

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..utils.io import atomic_write, check_writable_file, describe_os_error

PATTERN = re.compile(r'step_(\d+)\.pt$')


class Checkpointer:
    def __init__(self, directory: str, keep_last: int = 3):
        self.directory, self.keep_last = directory, keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f'step_{step:08d}.pt')

    def all(self) -> list[tuple[int, str]]:
        found = []
        for p in glob.glob(os.path.join(self.directory, 'step_*.pt')):
            m = PATTERN.search(p)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> str | None:
        found = self.all()
        return found[-1][1] if found else None

    def save(self, step: int, state: dict) -> str:
        """Write the checkpoint of ``step`` whole or not at all; older ones are pruned only after it is
        written. A failed write (a full disk) is one :class:`~unitok.utils.io.OutputError` naming the file."""
        path = self.path(step)
        atomic_write(path, lambda p: _save(state, p), mode='path', what='training checkpoint')
        if self.keep_last > 0:
            for _, old in self.all()[:-self.keep_last]:
                os.remove(old)
        return path

    def resolve(self, which: str) -> str:
        """``'latest'`` or a file path -> an existing checkpoint path."""
        if which == 'latest':
            path = self.latest()
            if path is None:
                raise CheckpointError(f'--resume latest: no checkpoint in {self.directory!r}')
            return path
        if not os.path.isfile(which):
            raise CheckpointError(f'no checkpoint file {which!r}')
        return which

    @staticmethod
    def load(path: str) -> dict:
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:        # a pickle that would run code: the one-line refusal
            from ..safe_pickle import unsafe_pickle_message
            raise CheckpointError(unsafe_pickle_message(path, e)) from None
        except Exception as e:
            raise CheckpointError(f'cannot read training checkpoint {path!r}: {type(e).__name__}: {e}') from None


def _save(state: dict, path: str) -> None:
    """``torch.save``, whose writer reports a failed write (disk full) as a RuntimeError without the
    cause: the cause is found again by writing a probe beside the file."""
    try:
        torch.save(state, path)
    except RuntimeError as e:
        try:
            check_writable_file(path)
        except OSError as probe:
            raise OSError(probe.errno, describe_os_error(probe)) from None
        raise OSError(errno.EIO, f'the write failed ({e})') from None


def capture_rng() -> dict:
    """Every RNG the training process draws from (torch CPU/CUDA, numpy, python)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached': float(cached)}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class TrainingState:
    """Assembles and restores everything a run needs to continue exactly, for any task.

    One file per checkpoint: ``step``, ``config``, ``task``, the main model (``model``, full state dict)
    with its optimizer (``optimizer``), every other phase under ``aux[name] = {'module', 'optimizer'}``,
    ``ema``, ``scaler``, ``extra`` (the task's), and per rank the RNG states and data position.
    """
    FORMAT = 'unitok-training-checkpoint'

    def __init__(self, trainer):
        self.t = trainer

    def state_dict(self) -> dict:
        t, s = self.t, self.t.strategy
        main, *aux = t.phases
        return {
            'format': self.FORMAT, 'task': t.task.name, 'step': t.step, 'config': t.cfg.to_dict(),
            'model': s.full_state_dict(t.model), 'optimizer': s.optimizer_state_dict(t.model, main.optimizer),
            'aux': {p.name: {'module': s.full_state_dict(p.module),
                             'optimizer': s.optimizer_state_dict(p.module, p.optimizer)} for p in aux},
            'ema': self._ema_state(), 'scaler': t.scaler.state_dict() if t.scaler else None,
            'extra': t.task.extra_state(),
            'ranks': s.all_gather_object({'rng': capture_rng(), 'data': t.data.state_dict()}),
            'world_size': t.info.world_size, 'num_workers': t.cfg.data.num_workers,
            'counters': {'skipped_samples': t.data.skipped, 'nonfinite_steps': t.nonfinite_steps},
        }

    def _ema_state(self):
        t = self.t
        if t.ema is None:
            return None
        if t.strategy.name != 'fsdp':
            return t.ema.state_dict()
        with t.ema.applied(t.model):
            full = t.strategy.full_state_dict(t.model)      # complete on rank 0 only (cpu_offload)
        return {'decay': t.ema.decay, 'updates': t.ema.updates,
                'shadow': {n: full[n] for n in t.ema.names} if t.info.is_main else None}

    def save(self) -> str | None:
        """Write a checkpoint of the current step (rank 0); never one with non-finite parameters."""
        t = self.t
        bad = not all(torch.isfinite(p).all() for p in t.model.parameters())
        if t.strategy.any(bad):
            logging.getLogger('unitok.train').error('step %d: parameters are not finite, checkpoint NOT written',
                                                    t.step)
            return None
        state = self.state_dict()
        path = t.checkpointer.save(t.step, state) if t.info.is_main else None
        t.strategy.barrier()
        return path

    def load(self, which: str) -> None:
        t, s = self.t, self.t.strategy
        path = s.broadcast_object(t.checkpointer.resolve(which) if t.info.is_main else None)
        state = t.checkpointer.load(path)
        check_training_checkpoint(state, path)
        if state['task'] != t.task.name:
            raise CheckpointError(f'{path}: a {state["task"]} checkpoint cannot resume a {t.task.name} run')
        if state['world_size'] != t.info.world_size or state['num_workers'] != t.cfg.data.num_workers:
            raise CheckpointError(f'{path}: saved with {state["world_size"]} process(es) x {state["num_workers"]} '
                                  f'loader worker(s); resume with the same to continue the data stream exactly')
        t.task.check_resume(state['config'])
        main, *aux = t.phases
        s.load_full_state_dict(t.model, state['model'])
        s.load_optimizer_state_dict(t.model, main.optimizer, state['optimizer'])
        for p in aux:
            if p.name not in state['aux']:
                raise CheckpointError(f'{path}: no state for {p.name!r} (saved: {sorted(state["aux"])}); '
                                      'was it trained with the same loss settings?')
            s.load_full_state_dict(p.module, state['aux'][p.name]['module'])
            s.load_optimizer_state_dict(p.module, p.optimizer, state['aux'][p.name]['optimizer'])
        if t.ema is not None and state['ema'] is not None:
            self._load_ema(state)
        if t.scaler is not None and state['scaler'] is not None:
            t.scaler.load_state_dict(state['scaler'])
        t.task.load_extra_state(state['extra'])
        mine = state['ranks'][t.info.rank]
        restore_rng(mine['rng'])
        t.data.load_state_dict(mine['data'])
        t.data.skipped = int(state['counters']['skipped_samples'])
        t.nonfinite_steps = int(state['counters']['nonfinite_steps'])
        t.step = int(state['step'])
        if t.info.is_main:
            logging.getLogger('unitok.train').info('resumed from %s at step %d', path, t.step)

    def _load_ema(self, state: dict) -> None:
        t = self.t
        if t.strategy.name != 'fsdp':
            t.ema.load_state_dict(state['ema'])
            return
        from .ema import EMA
        with t.ema.applied(t.model):        # shard the full EMA weights through the model
            t.strategy.load_full_state_dict(t.model, {**state['model'], **state['ema']['shadow']})
            t.ema = EMA(t.model, t.cfg.optim.ema)
        t.ema.updates = int(state['ema']['updates'])


def check_training_checkpoint(state, path: str) -> None:
    """A clear error for files that are not training checkpoints of this version."""
    if isinstance(state, dict) and state.get('format') == TrainingState.FORMAT:
        return
    if isinstance(state, dict) and ('args' in state or 'trainer' in state):
        raise CheckpointError(f'{path!r} is an official UniTok release, not a training checkpoint: start a run from '
                              'its weights with --init, or convert it with `unitok convert`')
    if isinstance(state, dict) and 'step' in state and 'model' in state:
        raise CheckpointError(f'{path!r} is a training checkpoint of an older unitok version; it cannot be resumed')
    raise CheckpointError(f'{path!r} is not a unitok training checkpoint')
