"""The released MLLM's image generation, ours against the official ``T2I_forward_withcache`` path
(run through ``benchmarks/mllm_speed.py --official CLONE --official-python PY``).

Two sizes: ``tiny`` (the golden fixtures' configuration: LLM width 64, 2 layers; float32) and ``7b-2l``
(Llama-2-7B widths, 2 LLM layers, the head's 3 layers at width 4096; random bfloat16 weights). Each
checkpoint is written once in the official layout under ``--work``. The official loop runs in its own
environment (transformers 4.39, ``PY``) through ``scripts/make_mllm_golden.py --time``; ours in this
process with ``UniTokMLLM.from_pretrained``. Both: one prompt, the same guidance, greedy, after a
2-position warm-up, one thread each unless ``--threads``. Printed: image positions per second, the ratio,
the head's share of the time and whether the greedy codes agree.
"""
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {'tiny': dict(dtype='float32'),
         '7b-2l': dict(dtype='bfloat16', layers=2, hidden=4096, intermediate=11008, heads=32, vocab=32000)}


def checkpoint(work: str, size: str) -> str:
    folder = os.path.join(work, f'unitok_mllm_{size}')
    if os.path.isfile(os.path.join(folder, 'config.json')):
        return folder
    if size == 'tiny':
        sys.path.insert(0, os.path.join(ROOT, 'tests', 'mllm'))
        from official_golden import build_checkpoint
        return build_checkpoint(folder)
    from mllm_official_load_memory import make_checkpoint
    spec = {k: v for k, v in SIZES[size].items() if k != 'dtype'}
    make_checkpoint(folder, **spec)
    return folder


def ours(folder: str, dtype: str, prompt: str, cfg: float, positions: int) -> dict:
    import unitok.mllm.generate as gen
    from unitok.mllm import UniTokMLLM
    m = UniTokMLLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    head = {'s': 0.0}
    inner = gen.sample_position

    def timed(*a, **k):                   # the head's share: the time spent sampling the K sub-codes
        t = time.perf_counter()
        out = inner(*a, **k)
        head['s'] += time.perf_counter() - t
        return out
    gen.sample_position = timed
    try:
        m.config.grid = (1, 2)
        m.generate_image(prompt, cfg_scale=cfg, temperature=0)            # warm-up
        head['s'] = 0.0
        m.config.grid = (1, positions)
        t = time.perf_counter()
        codes = m.generate_image(prompt, cfg_scale=cfg, temperature=0)
        seconds = time.perf_counter() - t
    finally:
        gen.sample_position = inner
    return {'seconds': seconds, 'head_seconds': head['s'], 'codes': codes.flatten(2).tolist()}


def official(python: str, clone: str, folder: str, dtype: str, prompt: str, cfg: float, positions: int,
             threads: int) -> dict:
    cmd = [python, os.path.join(ROOT, 'scripts', 'make_mllm_golden.py'), '--official', clone, '--time', folder,
           '--prompt', prompt, '--cfg', str(cfg), '--positions', str(positions), '--dtype', dtype]
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f'the official run failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args) -> None:
    threads = args.threads or 1
    torch.set_num_threads(threads)
    prompt = 'a red apple on a wooden table'
    for size in args.sizes:
        spec = SIZES[size]
        folder = checkpoint(args.work, size)
        n = args.positions if size == 'tiny' else args.positions_7b
        a = ours(folder, spec['dtype'], prompt, args.cfg, n)
        b = official(args.official_python, args.official, folder, spec['dtype'], prompt, args.cfg, n, threads)
        same = sum(x == y for r, s in zip(a['codes'][0], b['codes'][0]) for x, y in zip(r, s)) / (8 * n)
        print(f'{size} ({spec["dtype"]}, cfg {args.cfg}, {n} positions x 8 sub-codes, {threads} thread(s)): '
              f'ours {n / a["seconds"]:.2f} positions/s (head {a["head_seconds"] / a["seconds"]:.0%}), official '
              f'{n / b["seconds"]:.2f} positions/s (head {b["head_seconds"] / b["seconds"]:.0%}); ours '
              f'{b["seconds"] / a["seconds"]:.2f}x faster; greedy codes equal: {same:.1%}', flush=True)
