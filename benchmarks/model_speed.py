"""Encode/decode wall time of a UniTok preset on this machine, fp32 and bf16 autocast, in one run.

    python benchmarks/model_speed.py --preset unitok-large --batch 1 8

Weights are random (speed does not depend on them). Each figure is the best of ``--repeat`` runs
after one warm-up. The bf16 rows are printed as a ratio against the fp32 rows of the same run.
"""
import argparse

import torch

import unitok
from timing import best_time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', default='unitok-large')
    p.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    p.add_argument('--repeat', type=int, default=2)
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--no-bf16', action='store_true')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = unitok.create_model(args.preset).eval()
    size = model.config.image_size
    print(f'{args.preset}: {model.parameter_counts()["total"] / 1e6:.0f} M parameters, {size} px, '
          f'{args.threads} threads')
    for batch in args.batch:
        x = torch.rand(batch, 3, size, size) * 2 - 1
        codes = model.encode(x)
        te = best_time(lambda: model.encode(x), args.repeat)
        td = best_time(lambda: model.decode(codes), args.repeat)
        print(f'batch {batch:3d} fp32: encode {te:7.3f} s ({te / batch:.3f} s/img)  decode {td:7.3f} s ({td / batch:.3f} s/img)')
        if not args.no_bf16:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                be = best_time(lambda: model.encode(x), args.repeat)
                bd = best_time(lambda: model.decode(codes), args.repeat)
                agree = (model.encode(x) == codes).float().mean().item()
            print(f'batch {batch:3d} bf16: encode {be:7.3f} s (x{te / be:.2f} vs fp32)  decode {bd:7.3f} s '
                  f'(x{td / bd:.2f} vs fp32)  codes equal to fp32: {agree:.1%}')


if __name__ == '__main__':
    main()
