"""Encode/decode wall time and peak memory of a UniTok preset: fp32, bf16 autocast and the bf16 fast path.

    nice python benchmarks/model_speed.py --preset unitok-large --batch 1 8
    python benchmarks/model_speed.py --official ~/src/UniTok --official-pythonpath ~/official-deps
    python benchmarks/model_speed.py --trained runs/genexp/tokenizers/K8_seed0/model   # + code agreement
    python benchmarks/model_speed.py --device cuda --batch 1 8 64 --compile             # on a GPU

Settings (``--settings``): ``fp32`` (the fp32 model), ``autocast`` (fp32 weights under bf16 autocast),
``bf16`` (the fast path, ``model.to(torch.bfloat16)``: bf16 weights, quantizer, its projections and the
CLIP head fp32), ``bf16-convs32`` (the fast path with the encoder's convolutional stages fp32:
``from_pretrained(..., fp32_encoder_convs=True)``; with ``--trained`` its code agreement is measured too). Each (setting, batch) runs in a fresh subprocess, so that its peak resident memory
(``ru_maxrss``; on CUDA also ``torch.cuda.max_memory_allocated``) is its own. Weights are random (speed
does not depend on them). Each time is the best of ``--repeat`` calls after one warm-up; all ratios are
between rows of the same run. ``--compile`` also compiles encoder and decoder with ``torch.compile``
(inductor) in the bf16 setting and prints the compile time (the warm-up call).

``--official DIR`` (a clone of github.com/FoundationVision/UniTok, released configuration only) also
times the official ``img_to_idx`` / ``idx_to_img`` (fp32) in one subprocess per batch on the same device
with the same threads, batches and repeats. The subprocess sees ``DIR`` and ``--official-pythonpath`` (where the official
code's own dependency pins are installed, e.g. its timm) ahead of this environment.

``--trained DIR`` (a trained model directory, e.g. the demo's tokenizer) measures on real images
(builtin:emoji val, resized to the model size) how faithful the fast path is to the fp32 model: the
share of equal codes, the disagreements that are not near ties by the rule of :mod:`unitok.precision`
(gap of the fp32 similarities <= |z - z'| |c_j* - c_j'| + 4 gamma_d; should be 0), the PSNR of the
reconstructions against the images next to fp32's (how many dB the fast path loses; target: under 0.5),
and the PSNR of the bf16 reconstructions against the fp32 reconstructions.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

import unitok
from unitok.precision import bf16_runs_in_hardware
from timing import best_time

BENCH = os.path.dirname(os.path.abspath(__file__))

# Runs inside the official repository's directory, on the benchmark's device; prints RESULT [encode_s,
# decode_s, peak_mb] (peak: resident memory on a CPU, allocated memory on CUDA, as for our rows).
OFFICIAL_TIMER = r'''
import json, resource, sys, torch
sys.path.insert(0, {bench!r})
from timing import best_time
from utils.config import Args
from models.unitok import UniTok
torch.set_num_threads({threads})
device = torch.device({device!r})
sync = torch.cuda.synchronize if device.type == 'cuda' else None
model = UniTok(Args()).eval().to(device)
batch = {batch}
with torch.no_grad():
    x = (torch.rand(batch, 3, 256, 256) * 2 - 1).to(device)
    idx = model.img_to_idx(x)
    model.idx_to_img(idx)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    te = best_time(lambda: model.img_to_idx(x), {repeat}, sync)
    td = best_time(lambda: model.idx_to_img(idx), {repeat}, sync)
peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == 'cuda'
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print('RESULT ' + json.dumps([te, td, peak]))
'''


def _result(proc, what):
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    if proc.returncode or not lines:
        raise SystemExit(f'{what} failed:\n{proc.stderr[-3000:]}')
    return json.loads(lines[-1][7:])


def official_times(args) -> dict[int, list[float]]:
    path = [os.path.abspath(args.official)] + ([os.path.abspath(args.official_pythonpath)]
                                               if args.official_pythonpath else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [os.environ.get('PYTHONPATH', '')]))
    out = {}
    for batch in args.batch:
        code = OFFICIAL_TIMER.format(bench=BENCH, threads=args.threads, batch=batch, repeat=args.repeat,
                                     device=args.device)
        proc = subprocess.run([sys.executable, '-c', code], cwd=args.official, env=env, capture_output=True, text=True)
        out[batch] = _result(proc, f'timing the official code in {args.official}')
    return out


def worker(args) -> None:
    """One (setting, batch) in this process: prints RESULT [encode_s, decode_s, peak_mb, compile_s]."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    model = unitok.create_model(args.preset).eval().to(device)
    if args.worker in ('bf16', 'bf16-convs32'):         # cast on the device: its bf16 units are what count
        model.keep_encoder_convs_fp32(args.worker == 'bf16-convs32').to(torch.bfloat16)
    compile_s = 0.0
    if args.compile and args.worker.startswith('bf16'):
        model.encoder.compile(mode='max-autotune-no-cudagraphs' if device.type == 'cuda' else None)
        model.decoder.compile()
    size, batch = model.config.image_size, args.worker_batch
    x = (torch.rand(batch, 3, size, size) * 2 - 1).to(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.worker == 'autocast')
    with ctx:
        t = time.perf_counter()
        codes = model.encode(x)
        model.decode(codes)
        sync()
        if args.compile and args.worker.startswith('bf16'):
            compile_s = time.perf_counter() - t
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        te = best_time(lambda: model.encode(x), args.repeat, sync)
        td = best_time(lambda: model.decode(codes), args.repeat, sync)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print('RESULT ' + json.dumps([te, td, peak, compile_s]))


def run_setting(args, setting: str, batch: int) -> list[float]:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', setting, '--worker-batch', str(batch),
           '--preset', args.preset, '--repeat', str(args.repeat), '--threads', str(args.threads),
           '--device', args.device] + (['--compile'] if args.compile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return _result(proc, f'the {setting} run at batch {batch}')


def faithfulness(args) -> None:
    """Code agreement and reconstruction PSNR of the fast path against fp32, on real images."""
    from unitok.data import open_source
    from unitok.data.transforms import eval_transform
    from unitok.eval.metrics import psnr
    ref = unitok.UniTok.from_pretrained(args.trained).eval()
    source = open_source('builtin:emoji', split='val')
    size = ref.config.image_size
    transform = eval_transform(size)
    n = min(args.images, len(source))
    images = torch.stack([transform(source.read(i)[0].convert('RGB')) for i in range(n)])
    with torch.no_grad():
        rec32 = torch.cat([ref.reconstruct(images[i:i + 32]) for i in range(0, n, 32)])
    psnr32 = psnr(rec32, images)
    print(f'\nfaithfulness on {n} builtin:emoji val images at {size} px through {args.trained}:')
    print(f' fp32: PSNR of the reconstructions against the images {psnr32.mean():.2f} dB (mean)')
    for tail in args.fp32_tail:
        fast = unitok.UniTok.from_pretrained(args.trained, dtype=torch.bfloat16, fp32_encoder_tail=tail).eval()
        faithfulness_row(ref, fast, images, rec32, psnr32,
                         f'bf16, last {tail} encoder block(s) fp32' if tail else 'bf16')
    if 'bf16-convs32' in args.settings:
        fast = unitok.UniTok.from_pretrained(args.trained, dtype=torch.bfloat16, fp32_encoder_convs=True).eval()
        faithfulness_row(ref, fast, images, rec32, psnr32,
                         'bf16-convs32 (bf16, the encoder\'s convolutional stages fp32)')


@torch.no_grad()
def faithfulness_row(ref, fast, images, rec32, psnr32, name: str) -> None:
    """Prints the codes' agreement by the near-tie rule, and the PSNR of ``fast``'s reconstructions
    against the images beside fp32's (the target: within 0.5 dB) and against fp32's reconstructions."""
    from unitok.eval.metrics import psnr
    from unitok.precision import compare_codes
    total, rec16 = None, []
    for i in range(0, images.shape[0], 32):
        x = images[i:i + 32]
        agree = compare_codes(ref, fast, x)
        total = agree if total is None else total.merge(agree)
        rec16.append(fast.reconstruct(x))
    rec16 = torch.cat(rec16)
    psnr16 = psnr(rec16, images)
    drop = psnr32 - psnr16
    print(f' {name}:')
    print(f'  bf16 codes equal to fp32 codes: {total.agreement:.2%} of {total.decisions} (token, sub-codebook) '
          f'decisions; {total.near_ties} near ties, {total.not_near_ties} disagreements that are not near ties')
    print(f'  largest fp32 similarity gap of a disagreement {total.max_gap:.2e}; unit-latent shift |z - z\'| '
          f'median {total.median_shift:.2e}, max {total.max_shift:.2e}')
    print(f'  PSNR of the reconstructions against the images: {psnr16.mean():.2f} dB (mean; fp32 {psnr32.mean():.2f}); '
          f'fp32 minus this: {drop.mean():+.3f} dB on average, at most {drop.max():+.3f} dB on one image')
    print(f'  PSNR of bf16 reconstructions against fp32 reconstructions: {psnr(rec16, rec32).mean():.1f} dB (mean)')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', default='unitok-large')
    p.add_argument('--batch', type=int, nargs='*', default=[1, 8], help='batches to time (none: only --trained)')
    p.add_argument('--repeat', type=int, default=2)
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--settings', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'autocast', 'bf16', 'bf16-convs32'])
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--compile', action='store_true', help='torch.compile encoder and decoder (bf16 setting)')
    p.add_argument('--official', metavar='DIR', help='clone of the official repository to time as the reference')
    p.add_argument('--official-pythonpath', metavar='DIR', help="where the official code's dependencies live")
    p.add_argument('--trained', metavar='DIR', help='trained model directory: code agreement and PSNR vs fp32')
    p.add_argument('--images', type=int, default=256, help='images for --trained (default 256)')
    p.add_argument('--fp32-tail', type=int, nargs='+', default=[0],
                   help='--trained: also the settings that keep the last N encoder blocks fp32 (default 0)')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    p.add_argument('--worker-batch', type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.official and args.preset != 'unitok-large':
        p.error('--official times the released configuration: use --preset unitok-large')
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device here')
    torch.set_num_threads(args.threads)
    print(f'{args.preset}, {args.device}, {args.threads} threads; load average {os.getloadavg()[0]:.1f} at start')
    if any(s.startswith('bf16') or s == 'autocast' for s in args.settings) and not bf16_runs_in_hardware(args.device):
        print(f'note: {args.device} has no bf16 units (on a CPU: AVX512-BF16 or AMX): bf16 matmuls are emulated, '
              'so the bf16 rows are slower than float32 here')
    reference = official_times(args) if args.official else {}
    mem = 'peak CUDA memory' if args.device == 'cuda' else 'peak RSS'
    for batch in args.batch:
        rows = {s: run_setting(args, s, batch) for s in args.settings}
        base = rows.get('fp32')
        for setting, (te, td, peak, compile_s) in rows.items():
            line = (f'batch {batch:3d} {setting:8s}: encode {te / batch:7.3f} s/img  decode {td / batch:7.3f} s/img  '
                    f'{mem} {peak:7.0f} MiB')
            if base and setting != 'fp32':
                line += f'  | vs fp32 ours: encode x{base[0] / te:.2f} decode x{base[1] / td:.2f}'
            if batch in reference:
                oe, od, _ = reference[batch]
                line += f'  | vs official fp32: encode x{oe / te:.2f} decode x{od / td:.2f}'
            if compile_s:
                line += f'  (compile + first call {compile_s:.0f} s)'
            print(line, flush=True)
        if batch in reference:
            oe, od, orss = reference[batch]
            print(f'batch {batch:3d} official : encode {oe / batch:7.3f} s/img  decode {od / batch:7.3f} s/img  '
                  f'{mem} {orss:7.0f} MiB', flush=True)
    if args.trained:
        faithfulness(args)
    print(f'load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
    main()
