"""Nearest-code search of MultiCodebookQuantizer vs a per-codebook Python loop and two libraries, in one run.

    python benchmarks/quantizer.py                 # latents (8, 256, 64), 8 x 4096 codes of 8 dims, 2 threads
    pip install -e '.[bench]' torch==2.14.1 torchvision==0.29.1   # faiss-cpu, vector-quantize-pytorch rows

The reference is the straightforward implementation (as in the official code): for each sub-codebook,
normalise its chunk, one float32 matmul against the normalised codes, argmax. Every row runs on the same
inputs and reports its time, its speed-up over the loop and how many codes differ from the loop's:

- the float32 vectorised search the quantizer used first (tiled bmm + max-reductions);
- the bf16 route (its search before the native kernel): bf16 GEMM on the CPU's bf16 units, then exact
  float32 re-scoring of the near-ties (must differ in 0 codes);
- ``MultiCodebookQuantizer.nearest_codes``: the route it takes here (the fused AVX-512 or AVX2 kernel
  of unitok/quantizers/native where it builds; the row names it), must differ in 0 codes;
- FAISS ``IndexFlatIP`` (exact inner-product search), one index per sub-codebook;
- vector-quantize-pytorch ``VectorQuantize`` (cosine similarity, 8 heads, one codebook per head).

The loop is timed at the start and at the end of the run: the two numbers show how noisy the machine
was (other processes, frequency changes). Times are the best of ``--repeat`` calls after a warm-up.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from timing import timed  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from unitok import MultiCodebookQuantizer
from unitok.quantizers import native
from unitok.quantizers.search import (_bf16_route_applies, _native_route_applies, _nearest_bf16, _nearest_fp32,
                                      _norm_max)


@torch.no_grad()
def loop_reference(quantizer: MultiCodebookQuantizer, latents: torch.Tensor) -> torch.Tensor:
    codes = []
    for k, chunk in enumerate(latents.split(quantizer.code_dim, dim=-1)):
        z = F.normalize(chunk.reshape(-1, quantizer.code_dim), dim=-1)
        table = F.normalize(quantizer.codebook[k], dim=-1)
        codes.append((z @ table.T).argmax(dim=1).view(latents.shape[:2]))
    return torch.stack(codes, dim=1)                                   # (B, K, L)


def split_tokens(quantizer: MultiCodebookQuantizer, latents: torch.Tensor) -> torch.Tensor:
    """The unit chunks nearest_codes searches: (B, L, K*d) -> (K, B*L, d)."""
    B, L, _ = latents.shape
    return quantizer._split(latents).view(B * L, quantizer.num_codebooks, quantizer.code_dim).transpose(0, 1)


def as_codes(codes: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(K, B*L) search output -> (B, K, L), the layout of nearest_codes."""
    return codes.view(-1, *latents.shape[:2]).transpose(0, 1)


@torch.no_grad()
def previous_search(quantizer: MultiCodebookQuantizer, latents: torch.Tensor) -> torch.Tensor:
    """nearest_codes as it was before the bf16 route: the same normalisation, the float32 search."""
    return as_codes(_nearest_fp32(split_tokens(quantizer, latents), quantizer.normalized_codebooks()), latents)


def bf16_route_row(quantizer: MultiCodebookQuantizer, latents: torch.Tensor):
    z, table = split_tokens(quantizer, latents), quantizer._search_table()
    if not _bf16_route_applies(z, table, _norm_max(z, table)):
        return None, 'bf16 route: not taken on this CPU (no AVX512-BF16 / AMX) or these inputs'

    @torch.no_grad()
    def search():
        return as_codes(_nearest_bf16(split_tokens(quantizer, latents), quantizer._search_table()), latents)
    return search, 'bf16 GEMM + exact re-scoring (before)'


def ours_row(quantizer: MultiCodebookQuantizer, latents: torch.Tensor):
    z, table = split_tokens(quantizer, latents), quantizer._search_table()
    norm_max = _norm_max(z, table)
    route = (f'native {native.isas()[0]}' if _native_route_applies(z, table, norm_max)
             else 'bf16 route' if _bf16_route_applies(z, table, norm_max) else 'float32')
    if not native.available():
        route += ', native kernel unavailable'
    return lambda: quantizer.nearest_codes(latents), f'MultiCodebookQuantizer.nearest_codes ({route})'


def faiss_row(quantizer, latents, threads):
    try:
        import faiss
    except ImportError:
        return None, 'faiss-cpu not installed (pip install faiss-cpu)'
    faiss.omp_set_num_threads(threads)
    tables = quantizer.normalized_codebooks().detach()
    indexes = []
    for k in range(quantizer.num_codebooks):
        index = faiss.IndexFlatIP(quantizer.code_dim)
        index.add(tables[k].numpy())
        indexes.append(index)
    B, L, _ = latents.shape

    def search():
        z = F.normalize(latents.view(B * L, quantizer.num_codebooks, quantizer.code_dim), dim=-1)
        codes = [torch.from_numpy(index.search(z[:, k].contiguous().numpy(), 1)[1][:, 0])
                 for k, index in enumerate(indexes)]
        return torch.stack(codes).view(quantizer.num_codebooks, B, L).transpose(0, 1)
    return search, f'FAISS {faiss.__version__} IndexFlatIP x{quantizer.num_codebooks}'


def vqp_row(quantizer, latents):
    try:
        import vector_quantize_pytorch
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None, 'vector-quantize-pytorch not installed'
    K, n, d = quantizer.num_codebooks, quantizer.codebook_size, quantizer.code_dim
    vq = VectorQuantize(dim=K * d, codebook_size=n, heads=K, separate_codebook_per_head=True,
                        use_cosine_sim=True, codebook_dim=d).eval()
    with torch.no_grad():
        vq._codebook.embed.copy_(quantizer.normalized_codebooks().detach())

    @torch.no_grad()
    def search():
        return vq(latents)[1].transpose(1, 2)                          # (B, L, K) -> (B, K, L)
    version = getattr(vector_quantize_pytorch, '__version__', '')
    return search, f'vector-quantize-pytorch {version} VectorQuantize(heads={K})'.replace('  ', ' ')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--shape', type=int, nargs=3, default=[8, 256, 64], metavar=('B', 'L', 'C'))
    p.add_argument('--codebooks', type=int, default=8)
    p.add_argument('--codes', type=int, default=4096)
    p.add_argument('--repeat', type=int, default=15)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, L, C = args.shape
    torch.manual_seed(args.seed)
    q = MultiCodebookQuantizer(args.codebooks, args.codes, C // args.codebooks).eval()
    latents = torch.randn(B, L, C)
    ref = loop_reference(q, latents)

    print(f'latents {tuple(latents.shape)}, {args.codebooks} x {args.codes} codes of {C // args.codebooks} dims, '
          f'{torch.get_num_threads()} threads, best of {args.repeat}; load average at start '
          f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')
    t_loop0, loop_times = timed(lambda: loop_reference(q, latents), args.repeat)
    rows = [('per-codebook loop (reference)', lambda: loop_reference(q, latents)),
            ('float32 vectorised search (first)', lambda: previous_search(q, latents))]
    for make in (lambda: bf16_route_row(q, latents), lambda: ours_row(q, latents),
                 lambda: faiss_row(q, latents, args.threads), lambda: vqp_row(q, latents)):
        fn, name = make()
        rows.append((name, fn))
    ours_identical = True
    for name, fn in rows:
        if fn is None:
            print(f'  {name}: skipped')
            continue
        codes = fn()
        t, _ = (t_loop0, loop_times) if name.startswith('per-codebook') else timed(fn, args.repeat)
        differ = int((codes != ref).sum())
        if not name.startswith(('FAISS', 'vector-quantize')):
            ours_identical &= differ == 0
        print(f'  {name:<60} {t * 1e3:8.2f} ms   x{t_loop0 / t:5.1f} vs loop   '
              f'{differ:6d} of {ref.numel()} codes differ')
    t_loop1, loop_times1 = timed(lambda: loop_reference(q, latents), args.repeat)
    print(f'noise: loop best {t_loop0 * 1e3:.1f} ms at the start, {t_loop1 * 1e3:.1f} ms at the end '
          f'(median {sorted(loop_times)[len(loop_times) // 2] * 1e3:.1f} / '
          f'{sorted(loop_times1)[len(loop_times1) // 2] * 1e3:.1f} ms); load average at the end '
          f'{os.getloadavg()[0]:.1f}')
    return 0 if ours_identical else 1


if __name__ == '__main__':
    raise SystemExit(main())
