"""Native CPU kernels: C++ sources in this folder, compiled on first use and loaded with :mod:`ctypes`.

Why hand-written: the nearest-code search of :mod:`unitok.quantizers.search` is bound by memory
traffic when built from library operations (a GEMM writes every similarity out and a second pass
reads them back for the argmax), and no maintained library offers a fused exact multi-codebook argmax
on CPU; the kernel in ``nearest_code.cpp`` keeps every similarity in registers. docs/RESULTS.md
compares it with FAISS, vector-quantize-pytorch and the PyTorch routes.

Why ctypes and not ``torch.utils.cpp_extension``: the kernel needs no PyTorch headers, so it builds
with one quick ``g++`` call, and a ctypes call releases the GIL.

Building: the shared library is cached in ``$UNITOK_NATIVE_CACHE`` (default
``~/.cache/unitok/native``), named by a hash of the source, the flags and the compiler's version, so
a changed source or compiler builds anew. It is compiled into a temporary file and renamed into place,
so a concurrent or interrupted build never leaves a half-written library to load. Where that folder
cannot be written, the library is built in a temporary folder that is removed once it is loaded.
``UNITOK_NATIVE=0`` turns the kernels off. Without a compiler, on a CPU without AVX-512 or AVX2 with
FMA, or when a build fails, the kernels are unavailable (logged once) and callers take their PyTorch
route. The kernel is written for both instruction sets (``isas()``: the ones this CPU runs, the
widest first); both compute the same chain, so they return the same codes.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

__all__ = ['available', 'isas', 'code_blocks', 'nearest_code', 'cache_dir', 'CODE_BLOCK']

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name('nearest_code.cpp')
_FLAGS = ('-O3', '-shared', '-fPIC', '-std=c++17', '-pthread', '-ffp-contract=off')
_BUILD_TIMEOUT_S = 300
CODE_BLOCK = 16          # codes per block of the kernel's code layout (one 512-bit register of float32)
_ISA_CODES = {'avx512': 2, 'avx2': 1}   # the kernel's isa argument
_STATUS = {1: 'this CPU lacks the instruction set', 2: 'invalid arguments', 3: 'a worker thread could not start'}


def cache_dir() -> Path:
    """Where built libraries are kept: ``$UNITOK_NATIVE_CACHE``, else ``~/.cache/unitok/native``."""
    env = os.environ.get('UNITOK_NATIVE_CACHE')
    return Path(env) if env else Path.home() / '.cache' / 'unitok' / 'native'


def _compiler() -> str | None:
    return os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')


def _build(compiler: str, folder: Path) -> Path:
    """The library built from ``_SOURCE`` with ``compiler`` in ``folder``, reused when it is there."""
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    key = hashlib.sha256(b'\0'.join([_SOURCE.read_bytes(), ' '.join(_FLAGS).encode(), version.encode()]))
    target = folder / f'{_SOURCE.stem}-{key.hexdigest()[:20]}.so'
    if target.exists():
        return target
    for stale in folder.glob(f'.{_SOURCE.stem}-*.tmp'):  # left by a build that was killed an hour ago or more
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f'.{target.name}.', suffix='.tmp', dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), '-o', tmp], capture_output=True, text=True,
                              timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f'{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}')
        os.replace(tmp, target)               # atomic: a reader sees no library or the whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for probe in (lib.unitok_cpu_has_avx512f, lib.unitok_cpu_has_avx2):
        probe.restype = ctypes.c_int
        probe.argtypes = []
    lib.unitok_nearest_code.restype = ctypes.c_int
    lib.unitok_nearest_code.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, i64, i64]
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get('UNITOK_NATIVE', '1').strip().lower() in ('0', 'false', 'no', 'off'):
        return None
    if platform.machine().lower() not in ('x86_64', 'amd64'):
        return None                                    # the kernels are written for AVX-512 and AVX2
    compiler = _compiler()
    if compiler is None:
        logger.info('no C++ compiler found (set CXX); the native nearest-code search is off')
        return None
    try:
        folder = cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = _build(compiler, folder)
        except OSError as err:                         # e.g. a read-only home: build for this process only
            logger.info('cannot build in %s (%s); building the native kernels in a temporary folder', folder, err)
            return _load_private(compiler)
        try:
            lib = _declare(ctypes.CDLL(str(path)))
        except OSError:                                # a damaged cached file: build it once more
            path.unlink(missing_ok=True)
            lib = _declare(ctypes.CDLL(str(_build(compiler, folder))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning('building the native nearest-code search failed, using the PyTorch search: %s', err)
        return None
    return _usable(lib)


def _load_private(compiler: str) -> ctypes.CDLL | None:
    """Build and load the library in a temporary folder that is removed once it is loaded: the loaded
    mapping outlives the file (POSIX), so nothing is left behind in the temporary directory."""
    folder = Path(tempfile.mkdtemp(prefix='unitok-native-'))
    try:
        return _usable(_declare(ctypes.CDLL(str(_build(compiler, folder)))))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _usable(lib: ctypes.CDLL) -> ctypes.CDLL | None:
    if not _isas(lib):
        logger.info('this CPU lacks AVX-512F and AVX2 with FMA; the native nearest-code search is off')
        return None
    return lib


def available() -> bool:
    """Whether the native kernels are built, loaded and runnable on this CPU (builds them on first call)."""
    return _library() is not None


def isas() -> tuple[str, ...]:
    """The kernel's instruction sets this CPU runs, widest first: ``('avx512', 'avx2')``, ``('avx2',)``,
    or ``()`` when the kernels are unavailable."""
    lib = _library()
    return () if lib is None else _isas(lib)


@functools.lru_cache(maxsize=None)
def _isas(lib: ctypes.CDLL) -> tuple[str, ...]:
    """The library's CPU probes, asked once per loaded library (not at every search)."""
    return tuple(name for name, probe in (('avx512', lib.unitok_cpu_has_avx512f), ('avx2', lib.unitok_cpu_has_avx2))
                 if probe())


def code_blocks(vectors: torch.Tensor) -> torch.Tensor:
    """Code vectors (K, n, d) float32 in the kernel's layout: (K, ceil(n / 16), d, 16), coordinate-major
    blocks of 16 codes, NaN for the padding codes past n (a NaN similarity is never the largest)."""
    K, n, d = vectors.shape
    nb = -(-n // CODE_BLOCK)
    padded = vectors.new_full((K, nb * CODE_BLOCK, d), float('nan'))
    padded[:, :n] = vectors
    return padded.view(K, nb, CODE_BLOCK, d).transpose(2, 3).contiguous()


def nearest_code(z: torch.Tensor, blocks: torch.Tensor, num_threads: int | None = None,
                 isa: str | None = None) -> torch.Tensor:
    """argmax_j <z[k, i], c[k, j]> per k, i, first index among equal maxima: (K, N, d) -> (K, N) int64.

    ``blocks`` is :func:`code_blocks` of the codes. Every similarity is the in-order float32 FMA chain
    over the d coordinates; that equals ``z[k] @ c[k].T`` wherever the CPU GEMM computes that chain
    (the caller checks it). ``isa`` picks the instruction set (one of :func:`isas`; default the widest).
    Raises RuntimeError if the kernels are unavailable.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError('the native kernels are unavailable (see unitok.quantizers.native.available())')
    supported = _isas(lib)
    if isa is None:
        isa = supported[0]
    elif isa not in supported:
        raise ValueError(f'isa {isa!r} is not one this CPU runs: {supported}')
    if z.dim() != 3 or blocks.dim() != 4:
        raise ValueError(f'expected z (K, N, d) and blocks (K, nb, d, 16), got {tuple(z.shape)}, '
                         f'{tuple(blocks.shape)}')
    K, N, d = z.shape
    if blocks.shape[0] != K or blocks.shape[2] != d or blocks.shape[3] != CODE_BLOCK or blocks.shape[1] < 1:
        raise ValueError(f'blocks {tuple(blocks.shape)} do not match z {tuple(z.shape)}')
    for name, t in (('z', z), ('blocks', blocks)):
        if t.device.type != 'cpu' or t.dtype != torch.float32:
            raise TypeError(f'{name} must be a CPU float32 tensor, got {t.dtype} on {t.device}')
    z, blocks = z.contiguous(), blocks.contiguous()
    out = torch.empty(K, N, dtype=torch.int64)
    threads = max(1, num_threads if num_threads is not None else torch.get_num_threads())
    status = lib.unitok_nearest_code(z.data_ptr(), blocks.data_ptr(), K, N, d, blocks.shape[1],
                                     out.data_ptr(), threads, _ISA_CODES[isa])
    if status:
        raise RuntimeError(f'native nearest-code search failed: {_STATUS.get(status, status)}')
    return out
