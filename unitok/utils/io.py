"""Atomic writes and one clear error for every failed write.

Readers of a file written with :func:`atomic_write` see either the old file or the complete new one;
a directory of outputs written through :func:`staged_directory` appears complete or not at all.
A failed write (disk full, read-only location, permission, a directory in the way) raises
:class:`OutputError` naming the path and the cause, and leaves no temporary file behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import tempfile
from typing import Iterator


class OutputError(OSError):
    """A file or directory could not be written; the message says what, where and why."""

    def __str__(self) -> str:          # the message alone, without OSError's "[Errno N]" prefix
        return self.strerror or super().__str__()


def describe_os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return 'the disk is full (no space left on device)'
    if e.errno == errno.EDQUOT:
        return 'the disk quota is exceeded'
    if e.errno == errno.EROFS:
        return 'the file system is read-only'
    if e.errno in (errno.EACCES, errno.EPERM):
        return 'permission denied'
    if e.errno == errno.EISDIR:
        return 'a directory is in the way'
    if e.errno == errno.ENOTDIR:
        return 'a file is in the way of a directory on the path'
    return e.strerror or type(e).__name__


def output_error(what: str, path: str, e: OSError) -> OutputError:
    return OutputError(e.errno, f'cannot write {what} {path!r}: {describe_os_error(e)}')


def process_umask() -> int:
    """The process umask: read from /proc on Linux (without changing it), else set and restored."""
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write(path: str, write_fn, mode: str = 'wb', what: str = 'file') -> None:
    """Write ``path`` via a temporary file in the same directory and ``os.replace``; the file gets the
    permissions a plain ``open()`` would give it under the process umask.

    ``mode='path'`` hands ``write_fn`` the temporary path (for writers that open files themselves);
    otherwise ``write_fn`` receives an open file object in ``mode``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputError(errno.EISDIR, f'cannot write {what} {path!r}: it is an existing directory')
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
        if mode == 'path':
            os.close(fd)
            write_fn(tmp)
        else:
            with os.fdopen(fd, mode) as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
        # mkstemp's 0600 (and some writers' own) would hide the file from the other users of shared storage
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
        tmp = None
    except OutputError:
        raise
    except OSError as e:
        raise output_error(what, path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def check_writable_dir(directory: str, what: str = 'output directory') -> None:
    """Fail before any work when ``directory`` could not be written. Creates nothing: a directory that
    does not exist yet is judged by its nearest existing parent (a probe file is written and removed)."""
    _check_writable(directory, directory, what)


def check_writable_file(path: str, what: str = 'output file') -> None:
    """Fail before any work when ``path`` cannot be written: a directory in the way, or its
    directory not writable. The error names ``path``."""
    if os.path.isdir(path):
        raise OutputError(errno.EISDIR, f'cannot write {what} {path!r}: it is an existing directory')
    _check_writable(os.path.dirname(os.path.abspath(path)), path, what)


def _check_writable(directory: str, shown: str, what: str) -> None:
    target = os.path.abspath(directory)
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputError(errno.ENOTDIR, f'cannot write {what} {shown!r}: {directory!r} is an existing file')
    probe_dir = target
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        raise OutputError(errno.ENOTDIR, f'cannot write {what} {shown!r}: {probe_dir!r} is a file')
    try:
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix='.unitok-write-probe.')
        try:
            os.write(fd, b'\0' * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise output_error(what, shown, e) from None


@contextlib.contextmanager
def staged_directory(directory: str, what: str = 'output directory') -> Iterator[str]:
    """Write many files into ``directory`` all-or-nothing.

    Yields a fresh hidden sibling directory to write into. When the block ends without error its
    files move into ``directory`` (which is created, or merged into if it exists: same-named files
    are replaced); on any error the staging directory is deleted, so neither half of the outputs
    nor an empty ``directory`` is left behind. Write failures become :class:`OutputError`.
    """
    target = os.path.abspath(directory)
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputError(errno.ENOTDIR, f'cannot write {what} {directory!r}: it is an existing file')
    parent, created = os.path.dirname(target), []
    probe = parent
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    staging = None
    try:
        try:
            os.makedirs(parent, exist_ok=True)
            while staging is None:
                candidate = os.path.join(parent, f'.{os.path.basename(target)}.{secrets.token_hex(4)}.tmp')
                try:
                    os.mkdir(candidate)          # the umask's permissions, unlike tempfile.mkdtemp's 0700
                    staging = candidate
                except FileExistsError:
                    continue
        except OSError as e:
            raise output_error(what, directory, e) from None
        yield staging                            # errors of the caller's block pass through unchanged
        try:
            if not os.path.exists(target):
                os.replace(staging, target)
                staging = None
            else:
                for name in sorted(os.listdir(staging)):
                    os.replace(os.path.join(staging, name), os.path.join(target, name))
        except OSError as e:
            raise output_error(what, directory, e) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            if not os.path.exists(target):
                for d in created:                    # parents this call made, deepest first
                    with contextlib.suppress(OSError):
                        os.rmdir(d)
