"""The run directory: one run per directory, one process at a time, and a resume that continues the
run's own configuration.

* A fresh start into a directory that holds another run (its checkpoints, summary or final model) is
  refused: two runs' checkpoints never mix. A directory whose run stopped before its first checkpoint
  (a ``config.yaml``, logs) holds no run: the same command starts it again, ``--resume latest`` too.
* A lock file (``flock``) keeps a second concurrent process off the directory; the kernel releases
  it when the holder dies, kill -9 included. Forked children (data-loader workers) drop their copy of
  the lock's file descriptor, so that a killed trainer's workers, which notice the death only seconds
  later, do not keep the directory locked.
* ``--resume`` takes the configuration saved in the run; explicit settings on the command line are
  applied on top and reported; architecture changes are refused by the task before any weight loads.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import shutil

from ..config import ConfigError
from ..utils.io import OutputError, check_writable_dir

log = logging.getLogger('unitok.train')
CONFIG_FILE = 'config.yaml'
LOCK_FILE = '.lock'


_HELD_LOCKS: set[int] = set()          # file descriptors of the run-directory locks this process holds


def _drop_locks_in_child() -> None:
    """After a fork: point the inherited lock descriptors at /dev/null. An ``flock`` belongs to the open
    file, shared with every forked child until each closes it; without this, loader workers of a
    trainer killed with SIGKILL would hold its run directory until they exit."""
    if not _HELD_LOCKS:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _HELD_LOCKS:
        os.dup2(null, fd)
    os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


class RunDirectoryError(RuntimeError):
    """The run directory is held by another run or process, or cannot be used."""


LEFTOVERS = ('metrics.jsonl', 'tensorboard', 'images', 'summary.json')   # logs of a run started afresh


def holds_run(directory: str) -> bool:
    """Whether ``directory`` holds a training run: a checkpoint, a summary or a final model. A run that
    stopped before its first checkpoint left nothing to continue, so it is none."""
    markers = ['summary.json', os.path.join('model', 'config.json')]
    return any(os.path.exists(os.path.join(directory, m)) for m in markers) or \
        bool(glob.glob(os.path.join(directory, 'checkpoints', 'step_*.pt')))


class RunDirectory:
    """Owns ``directory`` for the lifetime of a training process (rank 0 takes the lock)."""

    def __init__(self, directory: str, is_main: bool = True):
        self.directory, self.is_main = directory, is_main
        self._lock = None

    def acquire(self, resuming: bool) -> None:
        if not self.is_main:
            return
        check_writable_dir(self.directory, what='run directory')
        if not resuming and holds_run(self.directory):
            raise RunDirectoryError(
                f'{self.directory!r} already holds a training run; continue it with --resume latest, '
                'or start the new run in another --out directory (or delete the old one)')
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, LOCK_FILE)
        try:
            self._lock = open(path, 'a+')
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise RunDirectoryError(f'{self.directory!r} is in use by another training process '
                                    f'(lock {path!r} is held)') from None
        except OSError as e:
            raise OutputError(e.errno or errno.EIO, f'cannot lock run directory {self.directory!r}: {e}') from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f'{os.getpid()}\n')
        self._lock.flush()
        _HELD_LOCKS.add(self._lock.fileno())

    def clear_leftovers(self) -> None:
        """Remove the logs of a run that stopped before its first checkpoint (a fresh start at step 0
        appends to none of them)."""
        if not self.is_main:
            return
        found = [n for n in LEFTOVERS if os.path.lexists(os.path.join(self.directory, n))]
        if found:
            log.info('%s: the logs of a run stopped before its first checkpoint (%s) are replaced',
                     self.directory, ', '.join(found))
        for name in found:
            path = os.path.join(self.directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    def release(self) -> None:
        if self._lock is not None:
            _HELD_LOCKS.discard(self._lock.fileno())
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def saved_config(cfg_class, directory: str | None, checkpoint: str | None = None):
    """The configuration a run was started with: ``DIR/config.yaml``, else the one inside the
    checkpoint. Raises ConfigError when neither exists."""
    if directory and os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        return cfg_class.load(os.path.join(directory, CONFIG_FILE))
    if checkpoint and os.path.isfile(checkpoint):
        from .state import Checkpointer
        state = Checkpointer.load(checkpoint)
        if isinstance(state, dict) and isinstance(state.get('config'), dict):
            return cfg_class.from_dict(state['config'])
    raise ConfigError(f'cannot resume: no {CONFIG_FILE} in {directory!r}'
                      + (f' and no config in {checkpoint!r}' if checkpoint else ''))


def config_changes(old, new) -> dict[str, tuple]:
    """Flat ``{dotted key: (old, new)}`` of the settings that differ."""
    def flat(d, prefix=''):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != 'model':
                out.update(flat(v, f'{prefix}{k}.'))
            else:
                out[prefix + k] = v
        return out
    a, b = flat(old.to_dict()), flat(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
