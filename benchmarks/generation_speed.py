"""Sampling speed of the generator: KV cache vs none, the depth head's share, and the official code.

    python benchmarks/generation_speed.py                                   # gen-tiny widths, 16x16 grid
    python benchmarks/generation_speed.py --preset gen-B --batch 8
    python benchmarks/generation_speed.py --official ~/src/UniTok           # + official LlamaGen generate()

Prints, in one run, sampled grid positions per second (batch * h * w / seconds) of
``unitok.generation.generate`` with and without the KV caches at 256 positions, and checks that
greedy codes are equal; the share of the cached time spent in the depth head (its K steps and the
sampling of the K sub-codes). Weights are random (N(0, 0.02); speed does not depend on them).
Classifier-free guidance is on (scale ``--cfg-scale``), so both branches run batched.

``--official DIR`` (a clone of github.com/FoundationVision/UniTok) builds the official LlamaGen
``Transformer`` of ``eval/llamagen`` at the same size, copies its random weights into our model
(``prefix_rope='zero'``, shared output matrix, zero depth-head positions: the official architecture),
and times the official ``generate()`` on the same conditions: speed ratio, and whether the greedy
codes are the same (float32, and float64 where rounding cannot flip a near-tie).
"""
import argparse
import os
import sys
import time

import torch

from unitok.generation import GeneratorConfig, GeneratorModel, generate, sampling


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def timed(fn, repeat: int = 1):
    """(best seconds of ``repeat`` calls, result of the last call); waits for CUDA work to finish."""
    best, out = float('inf'), None
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def head_share(model, labels, kw) -> float:
    """Share of one cached sampling call spent in the output head (wraps the per-position head call)."""
    spent = [0.0]
    original = sampling.sample_position

    def wrapped(*a, **k):
        sync()
        t = time.perf_counter()
        out = original(*a, **k)
        sync()
        spent[0] += time.perf_counter() - t
        return out

    sampling.sample_position = wrapped
    try:
        total, _ = timed(lambda: generate(model, labels, **kw))
    finally:
        sampling.sample_position = original
    return spent[0] / total


# ---------------------------------------------------------------------- official LlamaGen code
def import_official(path: str):
    root = os.path.join(os.path.abspath(path), 'eval', 'llamagen')
    if not os.path.isfile(os.path.join(root, 'autoregressive', 'models', 'gpt.py')):
        raise SystemExit(f'--official {path!r}: no eval/llamagen/autoregressive/models/gpt.py there '
                         '(expected a clone of github.com/FoundationVision/UniTok)')
    sys.path.insert(0, root)
    from autoregressive.models import generate as official_generate
    from autoregressive.models import gpt as official_gpt
    return official_gpt, official_generate


def official_model(official_gpt, cfg: GeneratorConfig):
    args = official_gpt.ModelArgs(
        dim=cfg.dim, n_layer=cfg.depth, n_head=cfg.num_heads, n_output_layer=cfg.head_depth,
        vocab_size=cfg.num_codebooks * cfg.codebook_size, num_codebooks=cfg.num_codebooks,
        block_size=cfg.seq_len, num_classes=cfg.num_classes, cls_token_num=1, model_type='c2i',
        class_dropout_prob=0.1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    return official_gpt.Transformer(args).eval()


def from_official(state: dict, cfg: GeneratorConfig) -> GeneratorModel:
    """Our model holding the official model's weights (the official architecture as our config)."""
    K = cfg.num_codebooks
    ours = {
        'cond_embed.table.weight': state['cls_embedding.embedding_table.weight'],
        'code_embed.weight': torch.cat([state[f'tok_embeddings.codebooks.{k}.weight'] for k in range(K)]),
        'norm.weight': state['norm.weight'],
        'head.code_embed.weight': torch.cat([state[f'output.codebooks.{k}.weight'] for k in range(K - 1)]),
        'head.pos_embed': torch.zeros(K, cfg.dim),
        'head.norm.weight': state['output.norm.weight'],
        'head.weight': state['output.linear_head.weight'][None].repeat(K, 1, 1),
        'head.bias': state['output.linear_head.bias'][None].repeat(K, 1),
    }
    names = {'attention.wqkv': 'attn.qkv', 'attention.wo': 'attn.proj', 'feed_forward.w1': 'ffn.w1',
             'feed_forward.w2': 'ffn.w2', 'feed_forward.w3': 'ffn.w3', 'attention_norm': 'attn_norm',
             'ffn_norm': 'ffn_norm'}
    for prefix, to in (('layers', 'blocks'), ('output.layers', 'head.blocks')):
        depth = cfg.depth if prefix == 'layers' else cfg.head_depth
        for i in range(depth):
            for a, b in names.items():
                ours[f'{to}.{i}.{b}.weight'] = state[f'{prefix}.{i}.{a}.weight']
    model = GeneratorModel(cfg.replace(prefix_rope='zero', class_tokens=1))
    model.load_state_dict(ours, strict=True)
    return model.eval()


def compare_official(args, cfg, ours_kw, labels):
    official_gpt, official_generate = import_official(args.official)
    torch.manual_seed(0)
    off = official_model(official_gpt, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in off.named_parameters():
            if not name.endswith('norm.weight'):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    state = {k: v.clone() for k, v in off.state_dict().items() if 'kv_cache' not in k}
    ours = from_official(state, cfg).to(args.device)
    off = off.to(args.device)
    L, K, B = cfg.seq_len, cfg.num_codebooks, labels.shape[0]

    def run_official(model):
        with torch.no_grad():
            return official_generate.generate(model, labels, L, K, cfg_scale=args.cfg_scale, cfg_interval=-1,
                                              temperature=1.0, top_k=0, top_p=1.0, sample_logits=False)

    t_off = t_ours = float('inf')
    for _ in range(args.repeat):                                                # interleaved: same machine load
        t, codes_off = timed(lambda: run_official(off))
        t_off = min(t_off, t)
        t, codes_ours = timed(lambda: generate(ours, labels, **ours_kw))
        t_ours = min(t_ours, t)
    same32 = torch.equal(codes_off.long().flatten(), codes_ours.flatten())
    print(f'official LlamaGen generate() [{cfg.dim}x{cfg.depth}, {K}x{cfg.codebook_size} codes, cfg {args.cfg_scale}]:'
          f' {B * L / t_off:9.1f} positions/s')
    print(f'ours on the same weights:                 {B * L / t_ours:9.1f} positions/s  '
          f'-> ours {t_off / t_ours:.2f}x faster')
    print(f'greedy codes identical to the official (float32): {same32}')
    if args.float64_check:
        off64, ours64 = off.double(), ours.double()
        same64 = torch.equal(run_official(off64).long().flatten(), generate(ours64, labels, **ours_kw).flatten())
        print(f'greedy codes identical to the official (float64): {same64}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', default='gen-tiny')
    p.add_argument('--grid', type=int, nargs=2, default=(16, 16), help='h w (256 positions by default)')
    p.add_argument('--codebook-size', type=int, default=None, help='override the preset (default: its own)')
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--cfg-scale', type=float, default=2.0)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--repeat', type=int, default=2, help='best of N for the cached / official runs')
    p.add_argument('--device', default='cpu', help="e.g. 'cuda' (timings wait for the device)")
    p.add_argument('--official', default=None, help='path to a clone of github.com/FoundationVision/UniTok')
    p.add_argument('--no-float64-check', dest='float64_check', action='store_false')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    overrides = dict(grid=tuple(args.grid), num_classes=1000)
    if args.codebook_size:
        overrides['codebook_size'] = args.codebook_size
    cfg = GeneratorConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(0)
    model = GeneratorModel(cfg).eval()
    randomize(model)
    model.to(args.device)
    labels = (torch.arange(args.batch) * 7 % cfg.num_classes).to(args.device)
    kw = dict(cfg_scale=args.cfg_scale, temperature=0.0)
    L, B = cfg.seq_len, args.batch
    print(f'{args.preset} ({model.parameter_counts()["total"] / 1e6:.1f}M params, {cfg.num_codebooks}x'
          f'{cfg.codebook_size} codes, {cfg.head} head), grid {cfg.grid[0]}x{cfg.grid[1]} = {L} positions, '
          f'batch {B}, cfg {args.cfg_scale}, {args.device} ({args.threads} threads), torch {torch.__version__}')

    generate(model, labels, **kw)                                               # warm-up
    t_cache, codes = timed(lambda: generate(model, labels, **kw), args.repeat)
    t_none, codes_none = timed(lambda: generate(model, labels, use_cache=False, **kw))
    print(f'with KV cache:    {B * L / t_cache:9.1f} positions/s  ({t_cache:.2f} s)')
    print(f'without KV cache: {B * L / t_none:9.1f} positions/s  ({t_none:.2f} s)  -> cache {t_none / t_cache:.1f}x faster')
    print(f'greedy codes identical with and without the cache: {torch.equal(codes, codes_none)}')
    print(f'depth head share of the cached sampling time: {100 * head_share(model, labels, kw):.0f}% '
          f'({cfg.head_depth} block(s) x {cfg.num_codebooks} steps per position, incl. sampling the sub-codes)')

    if args.official is None:
        print('official comparison skipped: pass --official PATH_TO_UNITOK_CLONE '
              '(github.com/FoundationVision/UniTok) to time its LlamaGen generate() on the same weights')
        return
    if cfg.head != 'depth' or cfg.grid[0] != cfg.grid[1]:
        print('official comparison skipped: the official code has only the depth head and square grids')
        return
    compare_official(args, cfg, kw, labels)


if __name__ == '__main__':
    main()
