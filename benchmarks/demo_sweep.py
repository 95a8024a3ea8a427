"""Which ``unitok demo`` recipe: run recipes end to end, record each one's stage times and issue 27's
figures in one JSON file, re-judge each generator's samples at several guidance scales, and name the
fastest recipe that meets every target.

    python benchmarks/demo_sweep.py --out runs/demo_sweep                      # fast and legacy
    python benchmarks/demo_sweep.py --out runs/demo_sweep --recipes fast fast-clip1 --guidance 1 2 3 4
    python benchmarks/demo_sweep.py --out runs/demo_levers --tokenizer-only \
        --recipes fast-clip0.5 fast-clip0.25 fast-clip0.1-900 fast-clip0.25-1100 fast-cb4096

Resumable: a recipe already in ``OUT/sweep.json`` is not run again, a finished demo in ``OUT/RECIPE``
(e.g. ``unitok demo --out OUT/fast``) is taken as it is, and an interrupted one continues from its
checkpoints. Times are wall clock on a machine that may be shared: the file keeps the CPU
model and the load average before and after each recipe beside them.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from unitok.commands.demo import run_demo  # noqa: E402
from unitok.commands.demo_generation import judge_samples  # noqa: E402
from unitok.commands.demo_recipes import RECIPES  # noqa: E402
from unitok.data import open_source  # noqa: E402
from unitok.eval.generation import load_generator  # noqa: E402
from unitok.utils.io import atomic_write  # noqa: E402

_BASE = RECIPES['fast-clip0.5']          # the recipe the levers below were measured against


def _lever(clip: float | None = None, lr: str | None = None, steps: int | None = None, gen_steps: int | None = None,
           extra: tuple[str, ...] = ()):
    """``_BASE`` with one or two things changed: the CLIP weight, the learning rate, the steps, more overrides."""
    overrides = tuple(o for o in _BASE.overrides
                      if not (clip is not None and o.startswith('loss.clip=')) and not (lr and o.startswith('optim.lr=')))
    overrides += ((f'loss.clip={clip}',) if clip is not None else ()) + ((f'optim.lr={lr}',) if lr else ()) + extra
    return dataclasses.replace(_BASE, overrides=overrides, steps=steps or _BASE.steps,
                               gen_steps=gen_steps or _BASE.gen_steps)


# Variants, one lever each (docs/RESULTS.md section 11 has what they measured); `fast` is `fast-clip0.1-900`
# with 100 more tokenizer steps, 100 fewer generator steps and guidance 4.
VARIANTS = {
    **RECIPES,
    'fast-clip1': _lever(clip=1.0),
    'fast-clip0.25': _lever(clip=0.25),
    'fast-clip0.25-1100': _lever(clip=0.25, steps=1100),
    'fast-clip0.1-900': _lever(clip=0.1),
    'fast-cb4096': _lever(extra=('model.codebook_size=4096', 'model.code_dim=8')),
    'fast-lr2e-3': _lever(lr='2e-3'),
    'fast-short': _lever(steps=600, gen_steps=400),
}


def guidance_sweep(out: str, data: str, recipe, scales: list[float], temperatures: list[float] | None = None,
                   seed: int = 0) -> dict[str, dict]:
    """Consistency and shuffled-label control of the recipe's generator at each guidance scale and sampling
    temperature (default: the recipe's), keyed ``'G'`` at the recipe's temperature, else ``'G@T'``."""
    generator, tokenizer, info = load_generator(os.path.join(out, 'generator', 'model'),
                                                os.path.join(out, 'train', 'model'))
    templates = getattr(open_source(data, 'val'), 'templates', None) or ('a photo of a {}.',)
    rows = {}
    for t in temperatures or [recipe.temperature]:
        drawn = dataclasses.replace(recipe, temperature=t)
        for g in scales:
            key = f'{g:g}' if t == recipe.temperature else f'{g:g}@{t:g}'
            start = time.time()
            judged = judge_samples(generator, tokenizer, info['classnames'], templates, drawn, seed, guidance=g)
            rows[key] = {'guidance': g, 'temperature': t, 'consistency': judged['gen_consistency_zero_shot'],
                         'control': judged['gen_control_zero_shot'], 'samples': judged['gen_judged'],
                         'seconds': time.time() - start}
            print(f'[sweep]   guidance {g:g}, temperature {t:g}: consistency {rows[key]["consistency"]:.3f} '
                  f'(control {rows[key]["control"]:.3f})', flush=True)
    return rows


def choose(results: dict) -> str | None:
    """The recipe with the smallest total time among those that met every target, else None."""
    met = [(r['summary']['total_minutes'], name) for name, r in results.items()
           if r.get('summary') and 'gen_consistency_zero_shot' in r['summary']['targets_met']
           and all(r['summary']['targets_met'].values())]
    return min(met)[1] if met else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='runs/demo_sweep')
    p.add_argument('--recipes', nargs='+', default=['fast', 'legacy'], choices=sorted(VARIANTS))
    p.add_argument('--guidance', nargs='+', type=float, default=[1.0, 2.0, 3.0, 4.0])
    p.add_argument('--temperatures', nargs='+', type=float, help="sampling temperatures of the guidance sweep "
                   "(default: each recipe's)")
    p.add_argument('--data', default='builtin:emoji')
    p.add_argument('--tokenizer-only', action='store_true',
                   help='train and evaluate only the tokenizers (no generator): the quick comparison of tokenizer levers')
    args = p.parse_args(argv)
    path = os.path.join(args.out, 'sweep.json')
    results = {}
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            results = json.load(f)
    for name in args.recipes:
        if name in results:
            print(f'[sweep] {name}: done before, kept')
            continue
        recipe, out = VARIANTS[name], os.path.join(args.out, name)
        load_before = os.getloadavg()
        finished = os.path.join(out, 'demo_summary.json')     # a demo run that finished before: its own times
        gen_steps = 0 if args.tokenizer_only else None
        if not os.path.exists(finished) and run_demo(name, recipe, out, args.data, gen_steps=gen_steps) != 0:
            print(f'[sweep] {name}: interrupted; run again to continue')
            return 143
        with open(os.path.join(out, 'demo_summary.json'), encoding='utf-8') as f:
            summary = json.load(f)
        results[name] = {'recipe': dataclasses.asdict(recipe), 'summary': summary,
                         'load_average_before': load_before, 'load_average_after': os.getloadavg(),
                         'guidance': {} if 'gen_model' not in summary else
                         guidance_sweep(out, args.data, recipe, args.guidance, args.temperatures)}
        atomic_write(path, lambda f: f.write(json.dumps(results, indent=2).encode()))
    chosen = choose(results)
    for name, r in results.items():
        s = r['summary']
        print(f'[sweep] {name}: {s["total_minutes"]:.1f} min, PSNR {s["psnr"]:.2f}, zero-shot {s["zero_shot_top1"]:.3f}, '
              f'consistency {s.get("gen_consistency_zero_shot", float("nan")):.3f} at guidance '
              f'{s.get("gen_guidance", float("nan")):g}; targets met: {s["targets_met"]}')
    print(f'[sweep] chosen: {chosen or "none meets every target"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
