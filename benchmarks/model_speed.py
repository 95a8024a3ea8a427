"""Encode/decode wall time of a UniTok preset on this machine, fp32 and bf16 autocast, in one run.

    python benchmarks/model_speed.py --preset unitok-large --batch 1 8
    python benchmarks/model_speed.py --official ~/src/UniTok --official-pythonpath ~/official-deps

Weights are random (speed does not depend on them). Each figure is the best of ``--repeat`` runs
after one warm-up. The bf16 rows are printed as a ratio against the fp32 rows of the same run.

``--official DIR`` (a clone of github.com/FoundationVision/UniTok, released configuration only) also
times the official ``img_to_idx`` / ``idx_to_img`` in a subprocess with the same threads, batches
and repeats, and prints our fp32 times as ratios against them. The subprocess sees ``DIR`` and
``--official-pythonpath`` (where the official code's own dependency pins are installed, e.g. its
timm) ahead of this environment, so neither code base changes the other's imports.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

import unitok
from timing import best_time

# Runs inside the official repository's directory; prints {batch: [encode_s, decode_s]} as JSON.
OFFICIAL_TIMER = r'''
import json, sys, torch
sys.path.insert(0, {bench!r})
from timing import best_time
from utils.config import Args
from models.unitok import UniTok
torch.set_num_threads({threads})
model = UniTok(Args()).eval()
out = {{}}
with torch.no_grad():
    for batch in {batches!r}:
        x = torch.rand(batch, 3, 256, 256) * 2 - 1
        idx = model.img_to_idx(x)
        out[batch] = [best_time(lambda: model.img_to_idx(x), {repeat}), best_time(lambda: model.idx_to_img(idx), {repeat})]
print('RESULT ' + json.dumps(out))
'''


def official_times(args) -> dict[int, tuple[float, float]]:
    code = OFFICIAL_TIMER.format(bench=os.path.dirname(os.path.abspath(__file__)), threads=args.threads,
                                 batches=args.batch, repeat=args.repeat)
    path = [os.path.abspath(args.official)] + ([os.path.abspath(args.official_pythonpath)]
                                               if args.official_pythonpath else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-c', code], cwd=args.official, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    if proc.returncode or not lines:
        raise SystemExit(f'timing the official code in {args.official} failed:\n{proc.stderr[-3000:]}')
    return {int(b): tuple(t) for b, t in json.loads(lines[-1][7:]).items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', default='unitok-large')
    p.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    p.add_argument('--repeat', type=int, default=2)
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--no-bf16', action='store_true')
    p.add_argument('--official', metavar='DIR', help='clone of the official repository to time as the reference')
    p.add_argument('--official-pythonpath', metavar='DIR', help="where the official code's dependencies live")
    args = p.parse_args(argv)
    if args.official and args.preset != 'unitok-large':
        p.error('--official times the released configuration: use --preset unitok-large')
    torch.set_num_threads(args.threads)
    reference = official_times(args) if args.official else {}
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
        if batch in reference:
            oe, od = reference[batch]
            print(f'batch {batch:3d} official fp32: encode {oe:7.3f} s (ours x{oe / te:.2f} faster)  '
                  f'decode {od:7.3f} s (ours x{od / td:.2f} faster)')
        if not args.no_bf16:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                be = best_time(lambda: model.encode(x), args.repeat)
                bd = best_time(lambda: model.decode(codes), args.repeat)
                agree = (model.encode(x) == codes).float().mean().item()
            print(f'batch {batch:3d} bf16: encode {be:7.3f} s (x{te / be:.2f} vs fp32)  decode {bd:7.3f} s '
                  f'(x{td / bd:.2f} vs fp32)  codes equal to fp32: {agree:.1%}')


if __name__ == '__main__':
    main()
