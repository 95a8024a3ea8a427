"""Multi-codebook vector quantization (UniTok, arXiv 2502.20321, section 3.2).

A latent token of width ``K * d`` is split into K chunks of width d; chunk k is l2-normalised and
replaced by the most similar (cosine) l2-normalised code of its own sub-codebook k. With K
sub-codebooks of n codes the token can take n^K values while each lookup stays small.

The module is standalone (of the rest of UniTok it uses only :mod:`unitok.native`, an optional compiled
search kernel, and the bf16 hardware check of :mod:`unitok.precision`) and vectorised over sub-codebooks.

Axis legend used below: B batch, L tokens, K sub-codebooks, n codes per sub-codebook,
d code width, N = B * L.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import native
from .precision import bf16_runs_in_hardware

logger = logging.getLogger(__name__)

# Similarities scored per step of the float32 nearest-code search (K * n * tokens floats): ~8 MB on a
# CPU, where a tile should stay in cache; 256 MB on a GPU, where each step is about ten kernel launches
# and a CPU-sized tile (64 tokens at 8 x 4096 codes) would make the search launch-bound at large batches
# (the GPU size is reasoned, not measured: no GPU was lent to this project so far).
_SEARCH_TILE = 1 << 21
_SEARCH_TILE_GPU = 1 << 26


@dataclass
class QuantizerOutput:
    """Result of :meth:`MultiCodebookQuantizer.forward`.

    Attributes:
        quantized: (B, L, K*d) the selected codes, one unit vector per chunk. When the input requires
            grad this is the straight-through estimate ``z + sg(q - z)`` so gradients reach the encoder;
            otherwise exactly ``lookup(codes)``.
        codes: (B, K, L) int64 code ids, chunk k indexes sub-codebook k.
        losses: ``'commitment'``: ``beta * ||sg(q) - z||^2 + ||q - sg(z)||^2`` (mean over elements);
            ``'entropy'``: the codebook entropy loss (zero unless enabled).
        stats: detached statistics of this batch: ``'usage'`` (K,) share of each sub-codebook's codes
            chosen more than 1% of a uniform share (the official usage metric, as a fraction);
            ``'perplexity'`` (K,) exp(entropy) of the code histogram.
    """
    quantized: torch.Tensor
    codes: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class MultiCodebookQuantizer(nn.Module):
    """K sub-codebooks of ``codebook_size`` codes of width ``code_dim``, searched by cosine similarity.

    Args:
        num_codebooks: K.
        codebook_size: n, codes per sub-codebook.
        code_dim: d, width of each code; inputs are (B, L, K*d).
        beta: commitment weight.
        entropy_loss: compute the entropy regulariser (per-sample entropy minus codebook entropy).
        entropy_temperature: softmax temperature of that regulariser.
        sync_usage: sum each batch's code histogram over the processes of ``process_group`` before the
            usage statistics and the running :attr:`vocab_usage` are updated (what the official code does
            in distributed training). This is a collective: with it on, every process must run the same
            number of usage-updating forwards. Off by default, so that no forward pass ever talks to
            other processes unless asked; a trainer turns it on (``quantizer.sync_usage = True``) when
            it runs several processes. Without an initialised process group it does nothing.
        process_group: the group of that all-reduce; None is the default group.

    State dict: ``codebook`` (K, n, d) and the running code frequency ``vocab_usage`` (K, n). The
    official release stores them per sub-codebook (``codebooks.{k}.codebook.weight``,
    ``codebooks.{k}.vocab_usage``); such state dicts are accepted by ``load_state_dict`` as they are,
    and :func:`to_official_layout` converts back.
    """

    def __init__(self, num_codebooks: int, codebook_size: int, code_dim: int, beta: float = 0.25,
                 entropy_loss: bool = False, entropy_temperature: float = 0.01, sync_usage: bool = False,
                 process_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.num_codebooks, self.codebook_size, self.code_dim = num_codebooks, codebook_size, code_dim
        self.beta = beta
        self.sync_usage = sync_usage
        self.process_group = process_group
        self.use_entropy_loss = entropy_loss
        self.entropy_temperature = entropy_temperature
        self.codebook = nn.Parameter(torch.randn(num_codebooks, codebook_size, code_dim))
        self.register_buffer('vocab_usage', torch.zeros(num_codebooks, codebook_size))
        # Forward passes that updated the running usage (python-side in the official code).
        self.register_buffer('usage_updates', torch.zeros((), dtype=torch.long), persistent=False)
        # Offsets that turn per-sub-codebook ids into rows of the flattened (K*n, d) table.
        self.register_buffer('_offsets', torch.arange(num_codebooks) * codebook_size, persistent=False)
        self.register_load_state_dict_pre_hook(_from_official_layout)
        self._search_cache: tuple[torch.Tensor, _SearchTable] | None = None

    def extra_repr(self) -> str:
        return (f'num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, '
                f'code_dim={self.code_dim}, beta={self.beta:g}')

    # ------------------------------------------------------------------ tables
    def normalized_codebooks(self) -> torch.Tensor:
        """Unit-norm code vectors, (K, n, d) float32."""
        return F.normalize(self.codebook.float(), dim=-1)

    @torch.no_grad()
    def _search_table(self) -> _SearchTable:
        """The normalised codebooks prepared for the nearest-code search, rebuilt when the codebook changed.

        A copy of the raw codebook is the key: comparing it (~1 MB at released sizes) costs far less than
        the preparation, and holds whatever changed the codebook (optimizer steps, load_state_dict,
        sharded all-gathers).
        """
        raw = self.codebook.detach()
        cached = self._search_cache
        if (cached is None or cached[0].shape != raw.shape or cached[0].dtype != raw.dtype
                or cached[0].device != raw.device or not torch.equal(cached[0], raw)):
            cached = (raw.clone(), _SearchTable(F.normalize(raw.float(), dim=-1)))
            self._search_cache = cached
        return cached[1]

    @torch.no_grad()
    def init_codebooks(self, scale: float = 1.0) -> None:
        """Uniform init in +-scale * d^-0.5 / 36, the official ``vocab_init=-1`` rule."""
        bound = abs(scale) * self.code_dim ** -0.5 / 36
        self.codebook.uniform_(-bound, bound)

    # ------------------------------------------------------------------ codes <-> vectors
    def _split(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 3 or latents.shape[-1] != self.num_codebooks * self.code_dim:
            raise ValueError(f'quantizer expects latents (B, L, {self.num_codebooks * self.code_dim}), '
                             f'got {tuple(latents.shape)}')
        B, L, _ = latents.shape
        return F.normalize(latents.float().reshape(B, L, self.num_codebooks, self.code_dim), dim=-1)  # (B, L, K, d)

    @torch.no_grad()
    def nearest_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """Code ids of the most similar codes, (B, L, K*d) -> (B, K, L) int64: the float32 argmax (first
        index among equal maxima), under autocast and whatever ``torch.set_float32_matmul_precision`` says."""
        with torch.autocast(latents.device.type, enabled=False):
            z = self._split(latents)
            B, L = z.shape[:2]
            codes = _nearest(z.view(B * L, self.num_codebooks, self.code_dim).transpose(0, 1),
                             self._search_table())                 # (K, N)
        return codes.view(self.num_codebooks, B, L).transpose(0, 1)  # (B, K, L)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Unit code vectors for code ids: (B, K, L) -> (B, L, K*d) float32. Inverse of :meth:`nearest_codes`."""
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f'codes must be (B, {self.num_codebooks}, L), got {tuple(codes.shape)}')
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise TypeError(f'codes must be an integer tensor, got {codes.dtype}')
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f'codes must lie in [0, {self.codebook_size}), got values in '
                             f'[{int(codes.min())}, {int(codes.max())}]')
        B, K, L = codes.shape
        rows = codes.long().transpose(1, 2) + self._offsets         # (B, L, K) rows of the stacked table
        table = self.normalized_codebooks().view(K * self.codebook_size, self.code_dim)
        return F.embedding(rows, table).view(B, L, K * self.code_dim)

    # ------------------------------------------------------------------ training forward
    def forward(self, latents: torch.Tensor, update_usage: bool | None = None) -> QuantizerOutput:
        """Quantize ``latents`` (B, L, K*d); always in float32, whatever the autocast state.

        ``update_usage`` (default: ``self.training``) folds this batch's code histogram into
        :attr:`vocab_usage`; with :attr:`sync_usage` the histogram is summed over the processes first.
        """
        update_usage = self.training if update_usage is None else update_usage
        with torch.autocast(latents.device.type, enabled=False):
            z = self._split(latents)                                # (B, L, K, d)
            B, L, K, d = z.shape
            table = self.normalized_codebooks()                     # (K, n, d)
            with torch.no_grad():
                # The table normalised above, not the cached one: in training the codebook changes at
                # every step, so the cache would only add a copy and a comparison.
                codes = _nearest(z.detach().view(B * L, K, d).transpose(0, 1), table.detach())  # (K, N)
            rows = codes.transpose(0, 1) + self._offsets            # (N, K)
            q = F.embedding(rows, table.view(K * self.codebook_size, d)).view(B, L, K, d)
            commitment = F.mse_loss(q.detach(), z) * self.beta + F.mse_loss(q, z.detach())
            entropy = (_entropy_loss(z.view(B * L, K, d).transpose(0, 1), table, self.entropy_temperature)
                       if self.use_entropy_loss else z.new_zeros(()))
            # Straight-through estimator; without autograd the codes themselves (so lookup(codes) == quantized).
            quantized = (q.detach() - z.detach()) + z if z.requires_grad else q
            stats = self._batch_stats(codes, update_usage)
        return QuantizerOutput(
            quantized=quantized.view(B, L, K * d),
            codes=codes.view(K, B, L).transpose(0, 1),
            losses={'commitment': commitment, 'entropy': entropy},
            stats=stats,
        )

    @torch.no_grad()
    def code_histogram(self, codes: torch.Tensor) -> torch.Tensor:
        """Counts of each code, (K, n) float32, from codes (K, N)."""
        K, n = self.num_codebooks, self.codebook_size
        return torch.bincount((codes + self._offsets[:, None]).flatten(), minlength=K * n).view(K, n).float()

    @torch.no_grad()
    def _batch_stats(self, codes: torch.Tensor, update_usage: bool) -> dict[str, torch.Tensor]:
        counts = self.code_histogram(codes)                          # (K, n)
        if update_usage and self.sync_usage and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, group=self.process_group)
        freq = counts / counts.sum(-1, keepdim=True)
        usage = (freq > 0.01 / self.codebook_size).float().mean(-1)  # (K,)
        entropy = -(freq * torch.log(freq.clamp_min(1e-30))).sum(-1)
        if update_usage:
            self._update_usage(freq)
        return {'usage': usage, 'perplexity': entropy.exp()}

    def _update_usage(self, freq: torch.Tensor) -> None:
        # Official schedule: copy on the first update, EMA 0.9 for the next 99, then EMA 0.99.
        n_done = int(self.usage_updates)
        if n_done == 0:
            self.vocab_usage.copy_(freq)
        else:
            momentum = 0.9 if n_done < 100 else 0.99
            self.vocab_usage.mul_(momentum).add_(freq, alpha=1 - momentum)
        self.usage_updates += 1


def _from_official_layout(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: stack official per-sub-codebook entries into ``codebook``/``vocab_usage``."""
    for ours, theirs in (('codebook', 'codebook.weight'), ('vocab_usage', 'vocab_usage')):
        keys = [f'{prefix}codebooks.{k}.{theirs}' for k in range(module.num_codebooks)]
        if prefix + ours not in state_dict and all(k in state_dict for k in keys):
            state_dict[prefix + ours] = torch.stack([state_dict.pop(k) for k in keys])


def to_official_layout(state_dict: dict, prefix: str = 'quantizer.') -> dict:
    """Inverse of the loading hook: split ``codebook``/``vocab_usage`` into official per-sub-codebook keys."""
    out = {}
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name == 'codebook':
            out.update({f'{prefix}codebooks.{k}.codebook.weight': v for k, v in enumerate(value.unbind(0))})
        elif name == 'vocab_usage':
            out.update({f'{prefix}codebooks.{k}.vocab_usage': v for k, v in enumerate(value.unbind(0))})
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------- nearest-code search
#
# The reference is the per-sub-codebook float32 matmul ``(z[k] @ table[k].T).argmax(-1)``. For code
# widths like ours (d = 8) the CPU GEMM computes every similarity as one fused multiply-add chain over
# the d coordinates in order, s = fma(z[d-1], c[d-1], ... fma(z[0], c[0], 0)), one rounding per step.
# The native kernel computes that chain for every code, and the bf16 route for the codes it re-scores
# (:func:`_fma_chain_dot`); both are taken only where :func:`_gemm_is_fma_chain` confirmed that premise
# on the running machine.
# MKL computes the trailing rows of matrices with fewer than 13 rows in another order, so inputs of
# fewer than _MIN_SEARCH_TOKENS tokens are answered by the reference computation itself.

_MIN_SEARCH_TOKENS = 16
_BF16_TILE = 1 << 23            # bf16 distances scored per step of the bf16 route (16 MB)
_BF16_CHUNK = 1 << 14           # tokens per call of the bf16 route (its block minima: 32 MB at released sizes)
_BF16_BLOCK = 32                # codes per block of the candidate search
_MAX_CANDIDATE_BLOCKS = 8       # beyond this many candidate blocks a token is scored against every code
_U32 = 2.0 ** -24               # unit roundoff of float32 (24 significant bits)
_U16 = 2.0 ** -8                # unit roundoff of bfloat16 (8 significant bits)


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

        The bf16 route's per-tile buffers are tens of MB: allocated fresh, their pages fault in on
        every call (about a third of the search time when the allocator has just returned memory to
        the system), so one set is kept per table. A concurrent search (another thread) gets fresh ones.
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


def _gemm_width(d: int) -> int:
    """Width of the bf16 distance GEMM of :func:`_nearest_bf16`: 3d + 1 terms, padded to a multiple of 32."""
    return -(-(3 * d + 1) // 32) * 32


# Not traced by torch.compile (a compiled training step breaks its graph here, as the search's data-
# dependent routes would anyway): traced, its cached probes and the native library's loading would be
# re-run inside the trace (Dynamo ignores functools caches), and compiled it has nothing to fuse.
@torch.compiler.disable
def _nearest(z: torch.Tensor, table: torch.Tensor | _SearchTable) -> torch.Tensor:
    """argmax_j <z[k, i], table[k, j]> for every k, i: z (K, N, d), table (K, n, d) -> (K, N) int64.

    The result is identical to the float32 reference ``(z[k] @ table[k].T).argmax(-1)`` (first index
    among equal maxima). Routes, in order: on x86 CPUs with AVX-512 or AVX2 and a C++ compiler, the fused
    native kernel (:mod:`unitok.native`, about 30x the per-codebook loop at the released sizes with AVX-512, 11-14x with AVX2, see
    benchmarks/quantizer.py); on CPUs with bf16 dot-product units (AVX512-BF16, AMX) and l2-normalised
    inputs the bf16 route (:func:`_nearest_bf16`, about 10x); otherwise the float32 search.
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


def _argmax_rows(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The reference itself for one sub-codebook: (m, d) rows, (n, d) codes -> (m,) int64."""
    return (rows.contiguous() @ table.T).argmax(-1)


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
                               'width %d on this machine; using the PyTorch search', d)
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
    """Whether this machine's float32 matmul of width d equals :func:`_fma_chain_dot`, on a probe with
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


def _fma_chain_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise float32 dot products computed as the in-order FMA chain: (M, d), (M, d) -> (M,) float32.

    Every step s <- fl32(a_i * b_i + s) is a correctly rounded fused multiply-add, emulated in float64:
    the product of two float32 is exact in float64, the sum is rounded to odd (round to nearest, then,
    if that was inexact and the last bit is even, one step towards the exact sum, found with TwoSum),
    and a value rounded to odd with 53 >= 24 + 2 bits rounds to float32 exactly as the exact sum would
    (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using rounding
    to odd", IEEE TC 2008).
    """
    a, b = a.double(), b.double()
    s = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for i in range(a.shape[1]):
        p = a[:, i] * b[:, i]                                         # exact
        x = p + s
        bp = x - p
        err = (p - (x - bp)) + (s - bp)                               # TwoSum: p + s = x + err exactly
        bits = x.view(torch.int64)
        to_odd = ((err != 0) & (bits & 1 == 0)).long()
        # On the bit pattern, +1 moves away from zero and -1 towards it (x != 0 whenever err != 0).
        bits = bits + to_odd * torch.where((err > 0) == (x > 0), 1, -1)
        s = bits.view(torch.float64).float().double()
    return s.float()


def _bf16_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo + r with hi, lo bfloat16 and |r| <= 2^-16 |x| (x - hi is exact in float32)."""
    hi = x.bfloat16()
    return hi, (x - hi.float()).bfloat16()


def _bf16_error_bound(d: int) -> tuple[float, float]:
    """(A, beta): |D_j - (1 - s_j)| <= beta * |D_j| + A for every code j of :func:`_nearest_bf16`.

    D_j is the bf16 distance the route computes and s_j the reference float32 similarity. Inputs have a
    float32-computed norm <= 1 + 2^-10 (:func:`_bf16_route_applies`), so a true norm <= 1 + 2^-9 and
    sum_i |z_i c_i| <= nu := (1 + 2^-9)^2 (Cauchy-Schwarz). With u = 2^-24 (float32), b = 2^-8
    (bfloat16) and gamma_m = m u / (1 - m u):

    1. Split x = hi + lo + r (:func:`_bf16_split`): |x - hi| <= b|x|, |lo| <= (b + b^2)|x|, |r| <= b^2|x|.
       Of z.c = (z_hi + z_lo + r_z).(c_hi + c_lo + r_c) the GEMM gets P = z_hi.c_hi + z_hi.c_lo + z_lo.c_hi;
       the rest z_lo.c_lo + (z_hi + z_lo).r_c + r_z.c is at most [(b + b^2)^2 + (1 + b^2) b^2 + b^2] nu
       <= 3.02 b^2 nu.
    2. The GEMM multiplies bf16 pairs (8 x 8 significant bits: exact in float32) and adds the 3d + 1
       terms of 1 - P (the 1 is an exact 1 x 1) in float32 in some order: error <= gamma_{3d+1} times
       the sum of their magnitudes, <= 1 + (1 + b)^2 (1 + 2b + 2b^2) nu <= 1 + 1.02 nu.
    3. Its float32 result is stored as bf16: at most one bf16 ulp whatever the rounding mode,
       |D - v| <= 2b|v| <= beta |D| with beta = 2b / (1 - 2b).
    4. The reference s_j is itself a float32 dot product: |s_j - z.c_j| <= gamma_d nu.
    5. bf16 GEMMs flush subnormals (DAZ/FTZ): each of the 3d + 1 terms and partial sums moves by
       < 2^-125 in absolute value, which 2^-100 covers.
    A = 3.02 b^2 nu + gamma_{3d+1} (1 + 1.02 nu) + gamma_d nu + 2^-100, about 5e-5 for d = 8, and
    beta ~ 2^-7: the distances near the best code (~0.05-0.2) are resolved to ~1e-3.
    """
    def gamma(m):
        return m * _U32 / (1 - m * _U32)
    nu = (1 + 2.0 ** -9) ** 2
    b = _U16
    A = 3.02 * b * b * nu + gamma(3 * d + 1) * (1 + 1.02 * nu) + gamma(d) * nu + 2.0 ** -100
    return A, 2 * b / (1 - 2 * b)


def _bf16_thresholds(anchor: torch.Tensor, A: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate thresholds from the smallest bf16 distance of each token: (K, t) int16 bit patterns.

    Let j* be the reference argmax and a = D_j1 the bf16 distance of any code j1 (here the smallest).
    With the bound of :func:`_bf16_error_bound`: 1 - s_j* <= 1 - s_j1 <= a + beta|a| + A, and
    D_j* - beta|D_j*| - A <= 1 - s_j*, so D_j* - beta|D_j*| <= T := a + beta|a| + 2A, i.e. D_j* <= T / (1 - beta)
    when D_j* >= 0 (a negative D_j* lies below any positive threshold). Every code tied with j* in float32
    satisfies the same. T / (1 - beta) is raised by 2^-20 relative before the float32 conversion and
    rounded up to bf16, so the set {j : D_j <= threshold} contains all reference maximisers.

    Returns the thresholds and whether each is usable (positive and finite).
    """
    # bf16 bit patterns -> float32 values: the int16 -> int32 sign extension is shifted out.
    a = (anchor.int() << 16).view(torch.float32).double()
    thr = (a + beta * a.abs() + 2 * A) / (1 - beta) * (1 + 2.0 ** -20)
    usable = (thr > 0) & (thr < 2.0 ** 100)
    bits32 = thr.clamp(0, 2.0 ** 100).float().view(torch.int32)
    # For positive values the bit patterns order like the values; adding 0xffff rounds up to bf16.
    return ((bits32 + 0xFFFF) >> 16).to(torch.int16), usable


def _nearest_bf16(z: torch.Tensor, table: _SearchTable) -> torch.Tensor:
    """The bf16 route of :func:`_nearest` (CPU, float32, norms <= 1 + 2^-10): identical codes.

    1. Distances D = 1 - <z, c> to all codes are scored by one bf16 GEMM per tile of tokens on the bf16
       units. Each operand is split into bf16 hi + lo parts and the GEMM sums z_hi.c_hi + z_hi.c_lo +
       z_lo.c_hi (width 3d + 1 with the constant), so operand rounding costs ~2^-16 instead of 2^-8; the
       shift to distances puts the values near the best code (~0.1) where bf16 is finest.
    2. The bf16 values are compared as int16 bit patterns, which order like the values for positive
       numbers (negative distances come out below every positive threshold, as they must). Codes are
       grouped in blocks of _BF16_BLOCK. While a tile is in cache, each block's smallest distance, the
       second smallest of those and the distances of the best block are kept. The smallest distance of
       a token gives its threshold (:func:`_bf16_thresholds`): the codes at or below it hold every
       reference maximiser.
    3. A token with exactly one such code (no other in its best block, no other block's minimum at or
       below the threshold) gets that code: it is the only reference maximiser. That is most tokens;
       the others are resolved by :func:`_resolve_candidates`.
    """
    K, N, d = z.shape
    blk = _BF16_BLOCK
    codes_op = table.bf16_codes                                                       # (K, nb*blk, w)
    n_blocks = codes_op.shape[1] // blk
    z = z.contiguous()
    z_hi, z_lo = _bf16_split(z)
    tile = max(16, min(N, _BF16_TILE // (K * n_blocks * blk)))
    n_tiles = -(-N // tile)
    # Tokens as [-z_hi, -z_hi, -z_lo, 1, 0...] per tile, tile-major (n_tiles, K, w, tile): each GEMM operand
    # is contiguous (a strided one would be copied by every call).
    width = codes_op.shape[2]
    tokens_op = torch.zeros(K, width, n_tiles * tile, dtype=torch.bfloat16)
    tokens_op[:, :d, :N] = tokens_op[:, d:2 * d, :N] = -z_hi.transpose(1, 2)
    tokens_op[:, 2 * d:3 * d, :N] = -z_lo.transpose(1, 2)
    tokens_op[:, 3 * d] = 1
    tokens_op = tokens_op.view(K, width, n_tiles, tile).permute(2, 0, 1, 3).contiguous()
    block_ids = torch.arange(n_blocks, dtype=torch.int32).view(1, n_blocks, 1)
    bits = max(1, (n_blocks - 1).bit_length())
    # Per-tile results are kept tile-major, (n_tiles, K, ..., tile): every write below is contiguous
    # (reductions into strided outputs cost a fifth of the search here).
    block_min = torch.empty(n_tiles, K, n_blocks, tile, dtype=torch.int16)
    best_block = torch.empty(n_tiles, K, tile, dtype=torch.long)
    second_block = torch.empty(n_tiles, K, tile, dtype=torch.int32)   # (smallest minimum of the other blocks) << bits
    best_dists = torch.empty(n_tiles, K, blk, tile, dtype=torch.int16)  # distances of the best block
    with table.scratch() as get:
        buffer = get('distances', (K, n_blocks * blk, tile), torch.bfloat16)
        packed = get('packed', (K, n_blocks, tile), torch.int32)                  # see _first_min
        for j, s in enumerate(range(0, N, tile)):
            t = min(tile, N - s)
            dist = torch.bmm(codes_op, tokens_op[j, :, :, :t], out=buffer[:, :, :t])  # (K, nb*blk, t)
            dist = dist.view(torch.int16).view(K, n_blocks, blk, t)
            mins = torch.amin(dist, 2, out=block_min[j, :, :, :t])                   # (K, nb, t)
            # _first_min's packing, written out so that every result lands in its output slice
            # (calling _first_min here measured 4-6% slower for the whole search).
            p = torch.add(block_ids, mins, alpha=1 << bits, out=packed[:, :, :t])    # (mins << bits) | id
            b = torch.bitwise_and(p.amin(1), (1 << bits) - 1, out=best_block[j, :, :t])  # best block
            torch.amin(p.scatter_(1, b[:, None], torch.iinfo(torch.int32).max), 1, out=second_block[j, :, :t])
            torch.gather(dist, 1, b[:, None, None].expand(K, 1, blk, t), out=best_dists[j, :, None, :, :t])
    best_dists = best_dists.permute(1, 2, 0, 3).reshape(K, blk, -1)[..., :N]          # (K, blk, N)
    first, smallest, second_in_block = _first_min(best_dists, second=True)           # (K, N)
    best_block = best_block.transpose(0, 1).reshape(K, -1)[:, :N]                     # (K, N)
    second_block = second_block.transpose(0, 1).reshape(K, -1)[:, :N] >> bits
    thr, usable = _bf16_thresholds(smallest, *_bf16_error_bound(d))                  # (K, N)
    out = best_block * blk + first
    hard = (~usable | (second_in_block <= thr) | (second_block <= thr)).view(-1).nonzero().squeeze(1)
    if len(hard):
        out.view(-1)[hard] = _resolve_candidates(z, table, block_min, tile, thr, usable, hard)
    return out


def _first_min(x: torch.Tensor, second: bool = False) -> tuple[torch.Tensor, ...]:
    """First index of the minimum along dim 1 (int64), the minimum and, with ``second``, the smallest
    of the other values (int16): x int16 (K, m, t) -> (K, t) each.

    ``torch.argmin`` over an outer axis, and int16 comparisons, do not vectorise on CPU (4x the time of
    this); an int32 min-reduction does: each value is packed above its index, (x << bits) | i, which
    orders like (x, i), so the minimum of the packed values holds the minimum and its first index.
    """
    m = x.shape[1]
    bits = max(1, (m - 1).bit_length())
    packed = torch.add(torch.arange(m, dtype=torch.int32).view(1, m, 1), x, alpha=1 << bits)   # (x << bits) | i
    low = packed.amin(1)
    index = (low & ((1 << bits) - 1)).long()
    if not second:
        return index, (low >> bits).short()
    packed.scatter_(1, index[:, None], torch.iinfo(torch.int32).max)
    return index, (low >> bits).short(), (packed.amin(1) >> bits).short()


def _resolve_candidates(z: torch.Tensor, table: _SearchTable, block_min: torch.Tensor, tile: int,
                        thr: torch.Tensor, usable: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Codes of the tokens ``rows`` (k * N + i) with several bf16 candidates: (H,) int64.

    ``block_min`` (N / tile, K, nb, tile) holds the block minima of token i of sub-codebook k at
    [i // tile, k, :, i % tile].

    The codes of every block whose minimum lies at or below the token's threshold are scored again in
    float32 (error <= 2 gamma_d nu to the reference, see :func:`_fp32_candidates`), which leaves only
    float32 near-ties; a token with one left gets it, the others are re-scored exactly as the reference
    does (:func:`_fma_chain_dot`) and take the first code among the float32 maxima. Tokens with more
    than _MAX_CANDIDATE_BLOCKS candidate blocks (zero latents, collapsed codebooks) or an unusable
    threshold are scored by the reference float32 matmul against all codes.
    """
    K, N, d = z.shape
    vectors = table.vectors
    n = vectors.shape[1]
    k_r = rows // N
    z_r = z.reshape(K * N, d).index_select(0, rows)                                   # (H, d)
    i_r = rows - k_r * N
    cand = block_min[i_r // tile, k_r, :, i_r % tile] <= thr.view(-1)[rows][:, None]  # (H, nb)
    exact = ~usable.view(-1)[rows] | (cand.sum(1) > _MAX_CANDIDATE_BLOCKS)           # (H,)
    h_i, b_i = (cand & ~exact[:, None]).nonzero(as_tuple=True)                       # candidate blocks
    out = torch.empty(len(rows), dtype=torch.long)
    if len(h_i):
        h_i, code = _fp32_candidates(z_r, k_r, table, h_i, b_i)
        out[h_i] = code          # right where a token has one candidate left; the rest below
        multi = torch.bincount(h_i, minlength=len(rows))[h_i] > 1
        if multi.any():
            h_i, code = h_i[multi], code[multi]
            sims = _fma_chain_dot(z_r[h_i], vectors[k_r[h_i], code])                 # reference values
            best = torch.full((len(rows),), -math.inf).scatter_reduce(0, h_i, sims, 'amax')
            winner = sims == best[h_i]
            first = torch.full((len(rows),), n, dtype=torch.long).scatter_reduce(0, h_i[winner], code[winner], 'amin')
            out[h_i] = first[h_i]
    if exact.any():
        for k in range(K):
            sel = (exact & (k_r == k)).nonzero().squeeze(1)
            if len(sel):
                # Padded to >= 16 rows so the GEMM computes every row as the probed FMA chain.
                padded = torch.zeros(max(16, -(-len(sel) // 16) * 16), d)
                padded[:len(sel)] = z_r[sel]
                out[sel] = _argmax_rows(padded, vectors[k])[:len(sel)]
    return out


def _fp32_candidates(z_r, k_r, table: _SearchTable, h_i, b_i) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of the candidate blocks b_i of tokens h_i (rows of z_r, sub-codebooks k_r) that can still
    be a reference maximiser.

    They are scored in float32 in some summation order: the error to the exact z.c is, like the
    reference's, <= gamma_d nu, so 2 gamma_d nu to the reference. With m the best of these scores for
    a token (any code's score is an anchor, as in :func:`_bf16_thresholds`), every reference maximiser
    scores >= m - 4 gamma_d nu. The threshold m - 1.1 * 4 gamma_d nu is formed in float32: its one
    rounding (<= 2^-24 |m| <= 6.1e-8) is below the extra 0.4 gamma_d nu (~2e-7), so it stays below
    m - 4 gamma_d nu.

    Returns (token, code): the row of z_r of each remaining candidate and its code id.
    """
    H, d = z_r.shape
    n, blk = table.vectors.shape[1], _BF16_BLOCK
    coords = table.fp32_blocks                                                        # (d, K*nb, blk)
    n_blocks = coords.shape[1] // table.vectors.shape[0]
    rows = k_r[h_i] * n_blocks + b_i                                                  # (M,)
    z_rows = z_r.index_select(0, h_i).T.contiguous()                                  # (d, M)
    sims = coords[0].index_select(0, rows).mul_(z_rows[0, :, None])                   # (M, blk)
    for i in range(1, d):
        sims.addcmul_(coords[i].index_select(0, rows), z_rows[i, :, None])
    if n_blocks * blk > n:
        sims[(b_i[:, None] * blk + torch.arange(blk)) >= n] = -math.inf              # padding codes
    best = torch.full((H,), -math.inf).scatter_reduce(0, h_i, sims.amax(1), 'amax')
    gamma = d * _U32 / (1 - d * _U32)
    thr = best - 1.1 * 4 * gamma * (1 + 2.0 ** -9) ** 2                               # (H,) float32
    row, col = (sims >= thr[h_i][:, None]).nonzero(as_tuple=True)
    return h_i[row], b_i[row] * blk + col


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


def _entropy_loss(z: torch.Tensor, table: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over sub-codebooks of (per-sample entropy - entropy of the mean assignment).

    z (K, N, d), table (K, n, d); soft assignments are a softmax over negative squared distances.
    """
    dist2 = z.square().sum(-1, keepdim=True) + table.square().sum(-1)[:, None, :] - 2 * torch.bmm(z, table.transpose(1, 2))
    logits = -dist2 / temperature                                     # (K, N, n)
    prob, log_prob = logits.softmax(-1), logits.log_softmax(-1)
    per_sample = (-(prob * log_prob).sum(-1)).mean(-1)                # (K,)
    mean_prob = prob.mean(1)                                          # (K, n)
    codebook = -(mean_prob * torch.log(mean_prob + 1e-7)).sum(-1)     # (K,)
    return (per_sample - codebook).mean()
