"""The paper's central claim in miniature: multi-codebook quantization and joint training.

    python benchmarks/ablation_multicodebook.py --out runs/ablation --steps 500 --seeds 0 1

For each configuration it trains ``unitok-tiny`` on the built-in emoji data with the same CPU budget
(steps, batch, recipe), evaluates it on the held-out split with ``unitok.eval`` and writes
``results.json`` and a Markdown table (``results.md``) with mean and spread over seeds:

* K in {1, 2, 4, 8} sub-codebooks at the same total vocabulary (4096 codes) and the same latent
  width (32): K x (4096 / K) codes of 32 / K dims, trained jointly (reconstruction + CLIP);
* joint vs reconstruction-only (CLIP weight 0) vs CLIP-only (reconstruction weights 0) at K = 8.

Runs that already finished (their report exists) are reused, so an interrupted sweep continues.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VOCAB, WIDTH = 4096, 32
CONFIGS = {
    **{f'K={k}': [f'model.num_codebooks={k}', f'model.codebook_size={VOCAB // k}', f'model.code_dim={WIDTH // k}']
       for k in (1, 2, 4, 8)},
    'K=8 recon-only': ['model.num_codebooks=8', 'model.codebook_size=512', 'model.code_dim=4', 'loss.clip=0'],
    'K=8 CLIP-only': ['model.num_codebooks=8', 'model.codebook_size=512', 'model.code_dim=4', 'loss.l1=0',
                      'loss.l2=0'],
}
RECIPE = ['loss.perceptual=none', 'loss.discriminator=none', 'optim.lr=1e-3', 'optim.warmup=0.02',
          'data.batch_size=32', 'data.num_workers=1', 'log_every=50', 'image_every=0', 'ckpt_every=0']
METRICS = ('psnr', 'ssim', 'rfid_effnet-lite0', 'codebook_usage', 'codebook_perplexity', 'distinct_code_tuples',
           'zero_shot_top1', 'zero_shot_top5', 'recall@5')


def run(cmd):
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train_and_evaluate(out, tag, steps, seed, overrides, recipe=RECIPE, eval_args=()):
    """Train ``unitok-tiny`` with the recipe and ``overrides`` into ``out/tag`` and evaluate it on the
    held-out split (``eval_args``: more ``unitok eval`` arguments); returns the eval report (reused
    when it exists, resumed when checkpoints exist)."""
    unitok = [sys.executable, '-m', 'unitok.cli']
    run_dir = os.path.join(out, tag)
    report = os.path.join(run_dir, 'eval', 'report.json')
    if not os.path.isfile(report):
        t = time.time()
        resume = ['--resume', 'latest'] if os.path.isdir(os.path.join(run_dir, 'checkpoints')) else []
        run(unitok + ['train', '--preset', 'unitok-tiny', '--data', 'builtin:emoji', '--out', run_dir,
                      '--steps', str(steps), f'seed={seed}', f'eval_every={steps}', *recipe, *overrides, *resume])
        run(unitok + ['eval', '--model', os.path.join(run_dir, 'model'), '--data', 'builtin:emoji',
                      '--out', os.path.join(run_dir, 'eval'), '--batch-size', '64', '--name', tag, *eval_args])
        print(f'{tag}: {(time.time() - t) / 60:.1f} min', flush=True)
    with open(report) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='runs/ablation')
    p.add_argument('--steps', type=int, default=500)
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--only', nargs='*', help='subset of configuration names')
    args = p.parse_args(argv)
    results = {}
    for name, overrides in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            tag = name.replace('=', '').replace(' ', '_') + f'_seed{seed}'
            results.setdefault(name, []).append(train_and_evaluate(args.out, tag, args.steps, seed, overrides))
    summary = {name: {m: [r[m] for r in runs if m in r] for m in METRICS} for name, runs in results.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump({'steps': args.steps, 'seeds': args.seeds, 'recipe': RECIPE, 'configs': CONFIGS,
                   'results': summary}, f, indent=2)
    table = markdown_table(summary, len(args.seeds))
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print(table)


def markdown_table(summary, n_seeds):
    def cell(values, fmt):
        if not values:
            return 'n/a'
        if len(values) == 1:
            return format(values[0], fmt)
        return f'{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}'
    fmts = {'psnr': '.2f', 'ssim': '.3f', 'rfid_effnet-lite0': '.1f', 'codebook_usage': '.3f',
            'codebook_perplexity': '.0f', 'distinct_code_tuples': '.0f', 'zero_shot_top1': '.3f',
            'zero_shot_top5': '.3f', 'recall@5': '.3f'}
    head = '| configuration | ' + ' | '.join(METRICS) + ' |'
    rule = '|---|' + '---|' * len(METRICS)
    rows = [f'| {name} | ' + ' | '.join(cell(vals[m], fmts[m]) for m in METRICS) + ' |' for name, vals in summary.items()]
    note = f'\n(mean ± standard deviation over {n_seeds} seeds)' if n_seeds > 1 else ''
    return '\n'.join([head, rule, *rows]) + note


if __name__ == '__main__':
    main()
