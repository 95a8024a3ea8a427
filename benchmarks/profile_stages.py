"""Where encode/decode time goes, per stage, against each stage's FLOP-limited time.

    nice python benchmarks/profile_stages.py --preset unitok-large --batch 1 --settings fp32 autocast bf16

Each stage's modules are wrapped in ``torch.profiler.record_function`` labels (forward hooks); the
profiler's CPU time per label is the stage time. GFLOP per stage come from
``torch.utils.flop_counter.FlopCounterMode`` (attention matmuls inside SDPA are added by hand: the
counter does not see the CPU SDPA kernel). The FLOP-limited time is GFLOP / peak, with the peak of a
large fp32 and bf16 matmul measured in the same run; "share" = FLOP-limited time / measured time
(1.0 = running at matmul peak). Norms count no FLOPs (memory bound): their share is "-".

Settings: ``fp32`` (the fp32 model), ``autocast`` (fp32 weights under bf16 autocast, the old path),
``bf16`` (the fast path: ``model.to(torch.bfloat16)``, weights held in bf16, quantizer in fp32).
Weights are random (time does not depend on them).
"""
import argparse
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

import unitok

STAGES = ('stem convs', 'MbConv', 'attention', 'MLP', 'norms', 'projections', 'quantizer',
          'up-sampling convs')


def stage_of_modules(model: nn.Module) -> dict[str, str]:
    """Outermost module name -> stage (a module inside a claimed one is not claimed again)."""
    rules = [('quant_proj', 'projections'), ('post_quant_proj', 'projections'),
             ('encoder.patch_embed.backbone.stem', 'stem convs'),
             ('encoder.patch_embed.backbone.stages', 'MbConv'),
             ('decoder.up_conv', 'up-sampling convs')]
    claimed: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(c + '.') for c in claimed) or name.startswith('text_encoder'):
            continue
        stage = next((s for prefix, s in rules if name.startswith(prefix)), None)
        leaf = name.rsplit('.', 1)[-1]
        if stage is None and leaf == 'attn':
            stage = 'attention'
        elif stage is None and leaf == 'mlp':
            stage = 'MLP'
        elif stage is None and isinstance(module, nn.LayerNorm):
            stage = 'norms'
        if stage is not None:
            claimed[name] = stage
    return claimed


def attach_labels(model: nn.Module) -> list:
    """record_function label per stage around each claimed module; the quantizer's search too."""
    handles, stack = [], []
    named = dict(model.named_modules())
    for name, stage in stage_of_modules(model).items():
        def pre(_m, _a, stage=stage):
            ctx = record_function('stage:' + stage)
            ctx.__enter__()
            stack.append(ctx)

        def post(_m, _a, _o):
            stack.pop().__exit__(None, None, None)
        handles += [named[name].register_forward_pre_hook(pre), named[name].register_forward_hook(post)]
    q = model.quantizer
    for method in ('nearest_codes', 'lookup'):
        orig = getattr(q, method)

        def wrapped(*a, orig=orig, **k):
            with record_function('stage:quantizer'):
                return orig(*a, **k)
        setattr(q, method, wrapped)
    return handles


def sdpa_gflop(model: nn.Module, batch: int, tokens: int) -> dict[str, float]:
    """FLOPs of q @ k^T and attn @ v inside SDPA, per stage (the FLOP counter misses them on CPU)."""
    out = defaultdict(float)
    for name, stage in stage_of_modules(model).items():
        m = dict(model.named_modules())[name]
        for sub in m.modules():
            heads, hd = getattr(sub, 'num_heads', None), getattr(sub, 'head_dim', None)
            if heads and hd:
                out[stage] += 4 * batch * heads * tokens ** 2 * hd / 1e9
    return out


def stage_gflop(model, fn, batch: int, tokens: int, kind: str) -> dict[str, float]:
    owner = {n: s for n, s in stage_of_modules(model).items()}
    with FlopCounterMode(display=False) as counter:
        fn()
    flops = defaultdict(float)
    # the counter names modules from the class of the outermost module it saw called
    roots = {'VisionTransformer': 'encoder', 'ViTaminDecoder': 'decoder',
             'AttnProjection': 'quant_proj' if kind == 'encode' else 'post_quant_proj'}
    for mod_name, ops in counter.get_flop_counts().items():
        root, _, rest = mod_name.partition('.')
        name = roots.get(root, root) + ('.' + rest if rest else '')
        if name in owner:
            flops[owner[name]] += sum(ops.values()) / 1e9
    total = counter.get_total_flops() / 1e9
    q = model.config
    # quantizer search: K sub-codebooks x tokens x n codes x d, one multiply-add each (encode only)
    if kind == 'encode':
        flops['quantizer'] += 2 * batch * tokens * q.num_codebooks * q.codebook_size * q.code_dim / 1e9
    extra = sdpa_gflop(model.encoder if kind == 'encode' else model.decoder, batch, tokens)
    for stage, g in extra.items():
        flops[stage] += g
    for name in ('quant_proj',) if kind == 'encode' else ('post_quant_proj',):
        for sub in getattr(model, name).modules():
            if getattr(sub, 'num_heads', None) and getattr(sub, 'head_dim', None):
                flops['projections'] += 4 * batch * sub.num_heads * tokens ** 2 * sub.head_dim / 1e9
    flops['total'] = total + sum(extra.values()) + (flops['quantizer'] if kind == 'encode' else 0)
    return flops


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeat: int = 3) -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype`` (best of ``repeat``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float('inf')
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def profile_setting(model, setting: str, fn, iters: int) -> tuple[dict[str, float], float]:
    """Stage -> seconds per call, and the wall time per call."""
    ctx = torch.autocast('cpu', dtype=torch.bfloat16) if setting == 'autocast' else nullcontext()
    with ctx:
        fn()                                            # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            wall = (time.perf_counter() - t) / iters
    times = {e.key[len('stage:'):]: e.cpu_time_total / 1e6 / iters
             for e in prof.key_averages() if e.key.startswith('stage:')}
    return times, wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', default='unitok-large')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--iters', type=int, default=1)
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--settings', nargs='+', default=['fp32', 'autocast', 'bf16'],
                   choices=['fp32', 'autocast', 'bf16'])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = {'fp32': matmul_peak(torch.float32), 'bf16': matmul_peak(torch.bfloat16)}
    print(f'{args.preset}, batch {args.batch}, {args.threads} threads; matmul peak: fp32 {peak["fp32"]:.0f} '
          f'GFLOP/s, bf16 {peak["bf16"]:.0f} GFLOP/s (2048^3, this run)')
    torch.manual_seed(0)
    base = unitok.create_model(args.preset).eval()
    size = base.config.image_size
    tokens = base.config.num_query + (size // 16) ** 2
    x = torch.rand(args.batch, 3, size, size) * 2 - 1
    codes = base.encode(x)
    gflop = {kind: stage_gflop(base, fn, args.batch, tokens, kind) for kind, fn in
             (('encode', lambda: base.encode(x)), ('decode', lambda: base.decode(codes)))}
    for setting in args.settings:
        model = base if setting != 'bf16' else unitok.create_model(args.preset).eval()
        if setting == 'bf16':
            model.load_state_dict(base.state_dict())
            model.to(torch.bfloat16)
        handles = attach_labels(model)
        pk = peak['bf16' if setting != 'fp32' else 'fp32']
        for kind, fn in (('encode', lambda: model.encode(x)), ('decode', lambda: model.decode(codes))):
            times, wall = profile_setting(model, setting, fn, args.iters)
            print(f'\n{setting} {kind}: {wall:.3f} s per call (batch {args.batch}); share = '
                  f'(GFLOP / {pk:.0f} GFLOP/s) / time')
            print(f'  {"stage":18s} {"time s":>8s} {"% time":>7s} {"GFLOP":>8s} {"share":>6s}')
            for stage in STAGES:
                t, g = times.get(stage, 0.0), gflop[kind].get(stage, 0.0)
                if t == 0 and g == 0:
                    continue
                share = f'{g / pk / t:6.2f}' if g and t else '     -'
                print(f'  {stage:18s} {t:8.3f} {t / wall:7.1%} {g:8.1f} {share}')
            other = wall - sum(times.values())
            print(f'  {"other (glue)":18s} {other:8.3f} {other / wall:7.1%}')
            g = gflop[kind]['total']
            print(f'  {"total":18s} {wall:8.3f} {1:7.1%} {g:8.1f} {g / pk / wall:6.2f}')
        for h in handles:
            h.remove()


if __name__ == '__main__':
    main()
