"""Which quantizer makes the best unified tokens? The quantizer family at equal bits, through generation.

    python benchmarks/quantizer_family.py --out runs/quantizers --steps 500 --seeds 0 1

Every quantizer of :mod:`unitok.quantizers` at 72 bits per token (multi-codebook 8 x 512, residual VQ
8 levels x 512, FSQ 8 groups x levels [8, 8, 8], LFQ and BSQ 8 groups x 9 bits), plus single VQ
1 x 4096 (12 bits) as the low anchor. Each is trained as ``benchmarks/ablation_multicodebook.py``
trains its rows (``unitok-tiny`` on the built-in emoji, the same recipe, joint reconstruction + CLIP)
and evaluated on the held-out split. Then on each tokenizer's codes the same ``gen-tiny`` depth-head
generator is trained (``unitok train-gen``) and evaluated (``unitok eval-gen``: held-out NLL, Fréchet
distance of samples, condition consistency with its shuffled-label control).

Every stage writes its own report (``OUT/<tag>/eval/report.json``, ``OUT/gen/<tag>/eval/report.json``)
and is skipped when that exists, so an interrupted sweep continues where it stopped. A stage that
fails is reported as failed in the table (its error in ``results.json``), not retried. Writes
``OUT/results.json`` and ``OUT/results.md``.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

from ablation_multicodebook import RECIPE, run, train_and_evaluate

SHAPE_72 = ['model.num_codebooks=8', 'model.codebook_size=512', 'model.code_dim=4']
# name -> (bits per token, overrides); LFQ and BSQ train with their entropy term (weight 0.1, MAGVIT-v2's)
QUANTIZERS = {
    'MCQ 8x512': (72, ['model.quantizer=multi_codebook', *SHAPE_72]),
    'RVQ 8 levels x 512': (72, ['model.quantizer=residual', *SHAPE_72]),
    'FSQ 8x[8,8,8]': (72, ['model.quantizer=fsq', 'model.quantizer_levels=[8,8,8]', *SHAPE_72]),
    'LFQ 8x9 bits': (72, ['model.quantizer=lfq', *SHAPE_72, 'loss.entropy=0.1']),
    'BSQ 8x9 bits': (72, ['model.quantizer=bsq', *SHAPE_72, 'loss.entropy=0.1']),
    'VQ 1x4096 (anchor)': (12, ['model.quantizer=vq', 'model.num_codebooks=1', 'model.codebook_size=4096',
                                'model.code_dim=32']),
}
GEN_RECIPE = ['model.head=depth', 'data.batch_size=64', 'optim.lr=1e-3', 'model.dropout=0.1', 'model.cond_dropout=0.1',
              'log_every=100', 'image_every=0', 'data.num_workers=0']
TOKENIZER_METRICS = {'psnr': '.2f', 'ssim': '.3f', 'rfid_effnet-lite0': '.1f', 'zero_shot_top1': '.3f',
                     'recall@5': '.3f', 'codebook_usage': '.3f', 'codebook_perplexity': '.0f',
                     'distinct_code_tuples': '.0f'}
GENERATOR_METRICS = {'nll_bits_per_token': '.2f', 'nll_nats_per_subcode': '.3f', 'fd_effnet-lite0': '.1f',
                     'consistency_zero_shot': '.3f', 'control_zero_shot': '.3f'}


def tag_of(name: str, seed: int) -> str:
    return name.split(' ')[0].lower() + f'_seed{seed}'


def timed(path: str, stage):
    """Run ``stage()`` once; its wall time in minutes is kept in ``path`` (JSON), reused afterwards."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    t = time.time()
    try:
        stage()
        record = {'minutes': (time.time() - t) / 60}
    except subprocess.CalledProcessError as e:       # reported in the table, not retried
        record = {'minutes': (time.time() - t) / 60, 'failed': f'exit {e.returncode}: {" ".join(e.cmd[2:5])}'}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(record, f)
    return record


def generator_stage(args, name: str, seed: int, tok_dir: str) -> dict:
    """Codes of the tokenizer ``tok_dir``, a ``gen-tiny`` depth-head generator on them, its evaluation."""
    unitok = [sys.executable, '-m', 'unitok.cli']
    tag = tag_of(name, seed)
    codes = {split: os.path.join(args.out, 'codes', tag, split) for split in ('train', 'val')}
    run_dir = os.path.join(args.out, 'gen', tag)
    report = os.path.join(run_dir, 'eval', 'report.json')

    def stage():
        for split, augment in (('train', 'flip'), ('val', 'none')):
            if not os.path.isfile(os.path.join(codes[split], 'manifest.json')):
                run(unitok + ['export-codes', '--model', tok_dir, '--data', 'builtin:emoji', '--split', split,
                              '--augment', augment, '--out', codes[split]])
        if not os.path.isfile(os.path.join(run_dir, 'model', 'config.json')):
            resume = ['--resume', 'latest'] if os.path.isdir(os.path.join(run_dir, 'checkpoints')) else []
            run(unitok + ['train-gen', '--codes', codes['train'], '--val-codes', codes['val'], '--tokenizer', tok_dir,
                          '--preset', 'gen-tiny', '--out', run_dir, '--steps', str(args.gen_steps), f'seed={seed}',
                          f'eval_every={args.gen_steps}', f'ckpt_every={max(1, args.gen_steps // 3)}', *GEN_RECIPE,
                          *resume])
        run(unitok + ['eval-gen', '--gen', os.path.join(run_dir, 'model'), '--data', 'builtin:emoji',
                      '--codes-val', codes['val'], '--out', os.path.join(run_dir, 'eval'),
                      '--samples-per-class', str(args.samples_per_class), '--cfg', '1.0', '--seed', str(seed),
                      '--max-train', str(args.max_train)])
    record = timed(os.path.join(run_dir, 'time.json'), stage)
    if 'failed' in record or not os.path.isfile(report):
        return {'failed': record.get('failed', 'no report')}
    with open(report) as f:
        r = json.load(f)
    K = len([k for k in r['held_out_nll'] if k.startswith('nll_')])
    at1 = next(m for m in r['sweep'] if m['cfg_scale'] == 1.0)
    nll = r['held_out_nll']['nll']                               # nats per sub-code, mean over the K sub-codes
    return {'nll_nats_per_subcode': nll, 'nll_bits_per_token': nll * K / math.log(2),
            **{m: at1[m] for m in ('fd_effnet-lite0', 'consistency_zero_shot', 'control_zero_shot')},
            'minutes': record['minutes']}


def eval_args(args) -> list[str]:
    return ['--max-samples', str(args.eval_samples)] if args.eval_samples else []


def tokenizer_stage(args, name: str, seed: int) -> dict:
    tag = tag_of(name, seed)
    holder: dict = {}
    record = timed(os.path.join(args.out, tag, 'time.json'),
                   lambda: holder.update(train_and_evaluate(args.out, tag, args.steps, seed, QUANTIZERS[name][1],
                                                            eval_args=eval_args(args))))
    if 'failed' in record:
        return {'failed': record['failed']}
    if not holder:                                               # finished earlier: read its report
        with open(os.path.join(args.out, tag, 'eval', 'report.json')) as f:
            holder.update(json.load(f))
    return {**{m: holder[m] for m in TOKENIZER_METRICS if m in holder}, 'minutes': record['minutes']}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='runs/quantizers')
    p.add_argument('--steps', type=int, default=500, help='tokenizer steps (the ablation recipe: 500)')
    p.add_argument('--gen-steps', type=int, default=600)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--samples-per-class', type=int, default=30)
    p.add_argument('--max-train', type=int, default=1800)
    p.add_argument('--eval-samples', type=int, help='held-out images of the tokenizer evaluation: a fixed '
                   'class-balanced subset of this many (default: all 380)')
    p.add_argument('--only', nargs='*', help='subset of: ' + ', '.join(QUANTIZERS))
    p.add_argument('--report-only', action='store_true', help='run nothing: the table of the stages that finished')
    args = p.parse_args(argv)
    start = time.time()
    names = [n for n in QUANTIZERS if not args.only or n in args.only]
    tokenizers: dict[str, list[dict]] = {n: [] for n in names}
    generators: dict[str, list[dict]] = {n: [] for n in names}
    for seed in args.seeds:     # seed by seed, tokenizers first: a cut-short sweep has every tokenizer once
        this_seed = {name: tokenizer_stage(args, name, seed) for name in names
                     if not args.report_only or os.path.isfile(os.path.join(args.out, tag_of(name, seed), 'time.json'))}
        for name, tok in this_seed.items():
            tokenizers[name].append(tok)
            if 'failed' in tok:
                generators[name].append({'failed': 'tokenizer failed'})
            elif not args.report_only or os.path.isfile(os.path.join(args.out, 'gen', tag_of(name, seed), 'time.json')):
                generators[name].append(generator_stage(args, name, seed, os.path.join(args.out, tag_of(name, seed), 'model')))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump({'steps': args.steps, 'gen_steps': args.gen_steps, 'eval_samples': args.eval_samples, 'seeds': args.seeds, 'recipe': RECIPE,
                   'gen_recipe': GEN_RECIPE, 'quantizers': {n: QUANTIZERS[n] for n in names},
                   'tokenizers': tokenizers, 'generators': generators}, f, indent=2)
    table = markdown(names, tokenizers, generators, len(args.seeds))
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    print(f'total {(time.time() - start) / 60:.1f} min (stages reused from earlier runs count as 0)')


def _cell(runs: list[dict], metric: str, fmt: str) -> str:
    values = [r[metric] for r in runs if metric in r]
    failed = sum('failed' in r for r in runs)
    if not values:
        return 'failed' if failed else 'n/a'
    text = format(values[0], fmt) if len(values) == 1 else \
        f'{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}'
    return text + (f' ({failed} failed)' if failed else '')


def markdown(names, tokenizers, generators, n_seeds) -> str:
    lines = ['| quantizer | bits/token | ' + ' | '.join(TOKENIZER_METRICS) + ' | minutes |',
             '|---|---|' + '---|' * (len(TOKENIZER_METRICS) + 1)]
    for name in names:
        lines.append(f'| {name} | {QUANTIZERS[name][0]} | '
                     + ' | '.join(_cell(tokenizers[name], m, f) for m, f in TOKENIZER_METRICS.items())
                     + f' | {_cell(tokenizers[name], "minutes", ".1f")} |')
    lines += ['', '| gen-tiny depth head on the codes of | ' + ' | '.join(GENERATOR_METRICS) + ' | minutes |',
              '|---|' + '---|' * (len(GENERATOR_METRICS) + 1)]
    for name in names:
        lines.append(f'| {name} | ' + ' | '.join(_cell(generators[name], m, f) for m, f in GENERATOR_METRICS.items())
                     + f' | {_cell(generators[name], "minutes", ".1f")} |')
    lines.append(f'\n(mean ± standard deviation over the seeds that finished, of {n_seeds}; a generator seed is its tokenizer\'s seed)')
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
