"""The bf16 route of the exact nearest-code search, and the in-order FMA chain it re-scores with.

Distances to every code are scored by a bf16 GEMM on the CPU's bf16 units; an error bound turns the
smallest bf16 distance of a token into a threshold that keeps every float32 maximiser, and the few
tokens with several candidates are re-scored in float32 and then exactly as the reference does.
Axis legend: K sub-codebooks, N tokens, n codes, d code width.
"""
from __future__ import annotations

import math

import torch

_BF16_TILE = 1 << 23            # bf16 distances scored per step of the bf16 route (16 MB)
_BF16_BLOCK = 32                # codes per block of the candidate search
_MAX_CANDIDATE_BLOCKS = 8       # beyond this many candidate blocks a token is scored against every code
_U32 = 2.0 ** -24               # unit roundoff of float32 (24 significant bits)
_U16 = 2.0 ** -8                # unit roundoff of bfloat16 (8 significant bits)


def _gemm_width(d: int) -> int:
    """Width of the bf16 distance GEMM of :func:`_nearest_bf16`: 3d + 1 terms, padded to a multiple of 32."""
    return -(-(3 * d + 1) // 32) * 32


def _argmax_rows(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The reference itself for one sub-codebook: (m, d) rows, (n, d) codes -> (m,) int64."""
    return (rows.contiguous() @ table.T).argmax(-1)


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
            # (calling _first_min would write to fresh tensors and copy them).
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

    ``torch.argmin`` over an outer axis, and int16 comparisons, do not vectorise on CPU; an int32
    min-reduction does: each value is packed above its index, (x << bits) | i, which orders
    like (x, i), so the minimum of the packed values holds the minimum and its first index.
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

