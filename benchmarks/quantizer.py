"""Index lookup of MultiCodebookQuantizer vs a per-codebook Python-loop reference, in one run.

    python benchmarks/quantizer.py                 # latents (8, 256, 64), 8 x 4096 codes of 8 dims

The reference is the straightforward implementation (as in the official code): for each sub-codebook,
normalise its chunk, one matmul against the normalised codes, argmax. Both run in float32 on the same
inputs; the script checks that the codes are identical and prints the speed-up.
"""
import argparse

import torch
import torch.nn.functional as F

from timing import best_time
from unitok import MultiCodebookQuantizer


@torch.no_grad()
def loop_reference(quantizer: MultiCodebookQuantizer, latents: torch.Tensor) -> torch.Tensor:
    codes = []
    for k, chunk in enumerate(latents.split(quantizer.code_dim, dim=-1)):
        z = F.normalize(chunk.reshape(-1, quantizer.code_dim), dim=-1)
        table = F.normalize(quantizer.codebook[k], dim=-1)
        codes.append((z @ table.T).argmax(dim=1).view(latents.shape[:2]))
    return torch.stack(codes, dim=1)                                   # (B, K, L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--shape', type=int, nargs=3, default=[8, 256, 64], metavar=('B', 'L', 'C'))
    p.add_argument('--codebooks', type=int, default=8)
    p.add_argument('--codes', type=int, default=4096)
    p.add_argument('--repeat', type=int, default=5)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    B, L, C = args.shape
    torch.manual_seed(args.seed)
    q = MultiCodebookQuantizer(args.codebooks, args.codes, C // args.codebooks).eval()
    latents = torch.randn(B, L, C)
    ours, ref = q.nearest_codes(latents), loop_reference(q, latents)
    identical = torch.equal(ours, ref)
    t_ref = best_time(lambda: loop_reference(q, latents), args.repeat)
    t_ours = best_time(lambda: q.nearest_codes(latents), args.repeat)
    print(f'latents {tuple(latents.shape)}, {args.codebooks} x {args.codes} codes of {C // args.codebooks} dims, '
          f'{torch.get_num_threads()} threads')
    print(f'per-codebook loop reference: {t_ref * 1e3:8.2f} ms')
    print(f'MultiCodebookQuantizer     : {t_ours * 1e3:8.2f} ms')
    print(f'speed-up x{t_ref / t_ours:.1f}; codes identical: {identical} '
          f'({int((ours != ref).sum())} of {ours.numel()} differ)')
    return 0 if identical else 1


if __name__ == '__main__':
    raise SystemExit(main())
