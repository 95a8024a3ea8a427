"""Exact nearest-code search: argmax_j <z[k, i], c[k, j]> per sub-codebook, identical to the float32
reference ``(z[k] @ table[k].T).argmax(-1)`` (first index among equal maxima), with fast routes.

For code widths like ours (d = 8) the CPU GEMM computes every similarity as one fused multiply-add
chain over the d coordinates in order, one rounding per step. The native kernel (:mod:`.native`)
computes that chain for every code, and the bf16 route (:mod:`.search_bf16`) for the codes it
re-scores; both are taken only where :func:`_gemm_is_fma_chain` confirmed that premise on the running
machine. MKL computes the trailing rows of matrices with fewer than 13 rows in another order, so
inputs of fewer than _MIN_SEARCH_TOKENS tokens are answered by the reference computation itself.
Axis legend: K sub-codebooks, N tokens, n codes, d code width.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading

import torch
import torch.nn.functional as F

import unitok.quantizers.native as native      # a module attribute: tests patch native.nearest_code

from ..precision import bf16_runs_in_hardware
from .search_bf16 import _BF16_BLOCK, _argmax_rows, _bf16_split, _fma_chain_dot, _gemm_width, _nearest_bf16

logger = logging.getLogger(__name__)

# Similarities scored per step of the float32 search (K * n * tokens floats): a CPU tile should stay in
# cache; on a GPU each step is about ten kernel launches, so a larger tile keeps it from being launch-bound.
_SEARCH_TILE = 1 << 21
_SEARCH_TILE_GPU = 1 << 26
_MIN_SEARCH_TOKENS = 16
_BF16_CHUNK = 1 << 14           # tokens per call of the bf16 route (its block minima: 32 MB at released sizes)


class _SearchTable:
    """Unit code vectors (K, n, d) float32 and the operands the nearest-code search derives from them.

    Each is built on first use and kept: :meth:`MultiCodebookQuantizer._search_table` holds one table
    until the codebook changes, so tokenizing a dataset prepares the codebooks once.
    """

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors
        self._scratch: dict[str, torch.Tensor] = {}
        self._scratch_lock = threading.Lock()

    def __getstate__(self) -> dict:        # copy.deepcopy / pickle of a quantizer: the operands are rebuilt
        return {'vectors': self.vectors}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state['vectors'])

    @contextlib.contextmanager
    def scratch(self):
        """``get(name, shape, dtype)`` -> an uninitialised work tensor, kept for the next search.

        The bf16 route's per-tile buffers are tens of MB; allocated fresh, their pages would fault in
        on every call, so one set is kept per table. A concurrent search (another thread) gets fresh ones.
        """
        if not self._scratch_lock.acquire(blocking=False):
            yield lambda name, shape, dtype: torch.empty(shape, dtype=dtype)
            return
        try:
            yield self._scratch_tensor
        finally:
            self._scratch_lock.release()

    def _scratch_tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        kept = self._scratch.get(name)
        if kept is None or kept.dtype != dtype or kept.numel() < size:
            kept = self._scratch[name] = torch.empty(size, dtype=dtype)
        return kept[:size].view(shape)

    @functools.cached_property
    def max_norm(self) -> float:
        return float(self.vectors.norm(dim=-1).amax()) if self.vectors.numel() else 0.0

    @functools.cached_property
    def bf16_codes(self) -> torch.Tensor:
        """(K, nb * blk, w) bfloat16: [c_hi, c_lo, c_hi, 1, 0...] per code, padding codes at distance 4.

        The width w is 3d + 1 rounded up to a multiple of 32 (the depth of an AMX bf16 tile: the GEMM
        runs ~3% faster than with a ragged width); the zero columns add exact zeros."""
        K, n, d = self.vectors.shape
        n_pad = -(-n // _BF16_BLOCK) * _BF16_BLOCK
        c_hi, c_lo = _bf16_split(self.vectors)
        out = torch.zeros(K, n_pad, _gemm_width(d), dtype=torch.bfloat16)
        out[:, :n, :3 * d + 1] = torch.cat([c_hi, c_lo, c_hi, torch.ones(K, n, 1, dtype=torch.bfloat16)], -1)
        out[:, n:, 3 * d] = 4     # above every real distance (<= 2.01) and every threshold
        return out

    @functools.cached_property
    def native_blocks(self) -> torch.Tensor:
        """(K, ceil(n / 16), d, 16) float32: the layout of the native kernel (:func:`unitok.native.code_blocks`)."""
        return native.code_blocks(self.vectors)

    @functools.cached_property
    def fp32_blocks(self) -> torch.Tensor:
        """(d, K * nb, blk) float32: coordinate i of the codes of each block, zero for padding codes."""
        K, n, d = self.vectors.shape
        n_blocks = -(-n // _BF16_BLOCK)
        padded = self.vectors.new_zeros(K, n_blocks * _BF16_BLOCK, d)
        padded[:, :n] = self.vectors
        return padded.view(K * n_blocks, _BF16_BLOCK, d).permute(2, 0, 1).contiguous()


# Not traced by torch.compile (a compiled training step breaks its graph here, as the search's data-
# dependent routes would anyway): traced, its cached probes and the native library's loading would be
# re-run inside the trace (Dynamo ignores functools caches), and compiled it has nothing to fuse.
@torch.compiler.disable
def _nearest(z: torch.Tensor, table: torch.Tensor | _SearchTable) -> torch.Tensor:
    """argmax_j <z[k, i], table[k, j]> for every k, i: z (K, N, d), table (K, n, d) -> (K, N) int64.

    The result is identical to the float32 reference ``(z[k] @ table[k].T).argmax(-1)`` (first index
    among equal maxima). Routes, fastest first: the fused native kernel (:mod:`.native`; x86 CPUs with
    AVX-512 or AVX2 and a C++ compiler); the bf16 route (:func:`_nearest_bf16`; CPUs with bf16
    dot-product units and l2-normalised inputs); otherwise the float32 search (benchmarks/quantizer.py
    compares them).
    """
    if isinstance(table, torch.Tensor):
        table = _SearchTable(table)
    K, N, d = z.shape
    with torch.autocast(z.device.type, enabled=False), _ieee_float32_matmuls():
        norm_max = _norm_max(z, table) if N >= _MIN_SEARCH_TOKENS else math.inf
        if not math.isfinite(norm_max):
            # Few tokens, or a NaN / inf (a diverged run): the reference itself. Its argmax takes a NaN
            # as the maximum, which none of the fast routes reproduces.
            return torch.stack([_argmax_rows(z[k], table.vectors[k]) for k in range(K)])
        if _native_route_applies(z, table, norm_max):
            return native.nearest_code(z, table.native_blocks)
        if _bf16_route_applies(z, table, norm_max):
            # In chunks of tokens: the route's per-token state (block minima...) stays bounded.
            return torch.cat([_nearest_bf16(z[:, c:c + _BF16_CHUNK], table) for c in range(0, N, _BF16_CHUNK)], 1)
        return _nearest_fp32(z, table.vectors)


_IEEE_LOCK = threading.Lock()
_IEEE_STATE = {'depth': 0, 'saved': None}        # searches running (any thread), the settings they replaced


@functools.lru_cache(maxsize=None)
def _matmul_backends() -> tuple:
    """cuBLAS's and oneDNN's float32-precision switches (PyTorch >= 2.9), or () on older versions; asked
    once (the search runs at every training step)."""
    backends = (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, 'matmul', None))
    try:
        [b.fp32_precision for b in backends]
    except AttributeError:
        return ()
    return backends


@contextlib.contextmanager
def _ieee_float32_matmuls():
    """float32 matmuls in IEEE float32 within the search, whatever the process chose for the rest of its
    work: with TF32 (CUDA; ``torch.set_float32_matmul_precision('high')``, or LlamaGen-style scripts that
    set ``allow_tf32``) or bf16 (oneDNN on CPUs with bf16 units; ``'medium'``) the similarities keep 10 or
    8 mantissa bits and the codes could differ from the float32 argmax. The settings are process-wide, so
    the first of concurrent searches (threads) saves and switches them and the last one restores them."""
    with _IEEE_LOCK:
        if _IEEE_STATE['depth'] == 0:
            backends = _matmul_backends()
            if backends:
                saved = [b.fp32_precision for b in backends]
                for backend in backends:
                    if backend.fp32_precision != 'ieee':
                        backend.fp32_precision = 'ieee'
            else:                                          # PyTorch < 2.9: the one global switch
                saved = torch.get_float32_matmul_precision()
                torch.set_float32_matmul_precision('highest')
            _IEEE_STATE['saved'] = (backends, saved)
        _IEEE_STATE['depth'] += 1
    try:
        yield
    finally:
        with _IEEE_LOCK:
            _IEEE_STATE['depth'] -= 1
            if _IEEE_STATE['depth'] == 0:
                backends, saved = _IEEE_STATE['saved']
                if backends:
                    for backend, value in zip(backends, saved):
                        if backend.fp32_precision != value:    # an unchanged one is not written again
                            backend.fp32_precision = value
                else:
                    torch.set_float32_matmul_precision(saved)


def _norm_max(z: torch.Tensor, table: _SearchTable) -> float:
    """The largest l2 norm of a token chunk or a code; inf if any value is NaN or inf (or a norm overflows)."""
    z_max = float(z.norm(dim=-1).amax()) if z.numel() else 0.0
    if not (math.isfinite(z_max) and math.isfinite(table.max_norm)):
        return math.inf
    return max(z_max, table.max_norm)


def _native_route_applies(z: torch.Tensor, table: _SearchTable, norm_max: float) -> bool:
    if z.device.type != 'cpu' or z.dtype != torch.float32 or table.vectors.dtype != torch.float32:
        return False
    if not _native_search_is_exact(z.shape[-1]):
        return False
    return norm_max <= 2.0 ** 30       # no product or partial sum of the chain can overflow


@functools.lru_cache(maxsize=None)
def _native_search_is_exact(d: int) -> bool:
    """Whether the native kernel is available and gives the reference's codes for width d here.

    The kernel computes the in-order FMA chain, which is the reference only where
    :func:`_gemm_is_fma_chain` holds; a probe with exact ties (repeated codes, first index wins), a
    codebook size that is not a multiple of the kernel's 16-code blocks and token counts that split
    unevenly across threads then checks the kernel itself on the running machine.
    """
    if not native.available() or not _gemm_is_fma_chain(d):
        return False
    gen = torch.Generator().manual_seed(1000 + d)
    with torch.autocast('cpu', enabled=False):
        for K, N, n in ((3, 37, 45), (2, 301, 300), (1, 16, 17)):
            codes = F.normalize(torch.randn(K, n, d, generator=gen), dim=-1)
            codes[:, n // 2] = codes[:, n // 3]                  # exact ties: the earlier index wins
            codes[:, n - 1] = codes[:, 0]
            z = F.normalize(torch.randn(K, N, d, generator=gen), dim=-1)
            z[:, :4] = codes[:, [n // 3, 0, n - 1, n // 2]]       # tokens whose best code is a tie
            want = torch.stack([_argmax_rows(z[k], codes[k]) for k in range(K)])
            got = native.nearest_code(z, native.code_blocks(codes))
            if not torch.equal(got, want):
                logger.warning('the native nearest-code search disagrees with the float32 reference at '
                               'width %d here; using the PyTorch search', d)
                return False
    return True


def _bf16_route_applies(z: torch.Tensor, table: _SearchTable, norm_max: float) -> bool:
    if z.device.type != 'cpu' or z.dtype != torch.float32 or table.vectors.dtype != torch.float32:
        return False
    if not bf16_runs_in_hardware('cpu'):
        return False                            # bf16 GEMMs would be emulated and slower than float32
    if table.vectors.shape[1] < 8 * _BF16_BLOCK:
        return False                            # small codebooks: the float32 search is as fast
    # The error bound of _nearest_bf16 holds for vectors of norm <= 1 + 2^-10 (l2-normalised, or the
    # zero vector of an all-zero chunk).
    return norm_max <= 1 + 2.0 ** -10 and _gemm_is_fma_chain(z.shape[-1])


@functools.lru_cache(maxsize=None)
def _gemm_is_fma_chain(d: int) -> bool:
    """Whether the running machine's float32 matmul of width d equals :func:`_fma_chain_dot`, on a probe with
    matrix shapes with and without kernel tails."""
    gen = torch.Generator().manual_seed(d)
    with torch.autocast('cpu', enabled=False):
        for m, n in ((16, 64), (37, 67), (300, 129)):
            a = F.normalize(torch.randn(m, d, generator=gen), dim=-1)
            b = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
            chain = _fma_chain_dot(a.repeat_interleave(n, 0), b.repeat(m, 1)).view(m, n)
            if not torch.equal(a @ b.T, chain):
                logger.info('float32 matmul of width %d is not an in-order FMA chain here; the nearest-code '
                            'search stays in float32', d)
                return False
    return True


def _nearest_fp32(z: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The float32 search of :func:`_nearest` for devices without the bf16 route (GPUs, CPUs without bf16
    dot-product instructions, non-finite inputs).

    ``torch.argmax`` of the float32 similarities (first index among equal maxima), but fast
    on CPU, where the (K, N, n) similarity matrix of released sizes is far larger than the caches and
    ``argmax`` itself is slow. Tokens are scored in tiles that stay in cache, as (K, n, tile) so that
    every reduction runs over an outer axis and vectorises over the tokens, and the argmax is found
    with max-reductions only: the best block of codes, then the first position equal to the maximum.
    """
    K, N, d = z.shape
    n = table.shape[1]
    block = next((b for b in (32, 64, 16, 128) if n % b == 0 and n > b), n)
    n_blocks = n // block
    z_t = z.transpose(1, 2).contiguous()                               # (K, d, N)
    table = table.contiguous()
    # Among positions equal to the maximum, the first one gets the largest weight.
    block_weight = torch.arange(n_blocks, 0, -1, dtype=torch.float32, device=z.device).view(1, n_blocks, 1)
    code_weight = torch.arange(block, 0, -1, dtype=torch.float32, device=z.device).view(1, block, 1)
    budget = _SEARCH_TILE if z.device.type == 'cpu' else _SEARCH_TILE_GPU
    tile = max(1, min(N, budget // max(1, K * n)))
    out = torch.empty(K, N, dtype=torch.long, device=z.device)
    buffer = torch.empty(K, n, tile, device=z.device)   # reused: fresh large allocations page-fault
    for s in range(0, N, tile):
        t = min(tile, N - s)
        sims = torch.bmm(table, z_t[:, :, s:s + t], out=buffer[:, :, :t]).view(K, n_blocks, block, t)  # (K, nb, blk, t)
        block_max = sims.amax(2)                                                      # (K, nb, t)
        best = block_max.amax(1, keepdim=True)                                        # (K, 1, t)
        b_idx = n_blocks - ((block_max == best) * block_weight).amax(1, keepdim=True).long()
        b_idx.clamp_(0, n_blocks - 1)                                                 # NaN rows: any code
        winner = sims.gather(1, b_idx[:, :, None].expand(K, 1, block, t)).squeeze(1)  # (K, blk, t)
        c_idx = (block - ((winner == best) * code_weight).amax(1).long()).clamp_(0, block - 1)
        out[:, s:s + t] = b_idx.squeeze(1) * block + c_idx
    return out


