"""Class-conditional generation over UniTok codes on the built-in emoji, measured end to end.

    python benchmarks/generation_results.py --out runs/genexp --seeds 0 1

One command for the generation tables of docs/RESULTS.md. Every stage reuses what an earlier
(interrupted) run finished, so running it again continues where it stopped:

1. tokenizers: ``unitok-tiny`` (64 px, 4x4 tokens of 8 x 512 codes) trained jointly (reconstruction +
   CLIP) and reconstruction-only, exactly as ``benchmarks/ablation_multicodebook.py`` trains its
   ``K=8`` and ``K=8 recon-only`` rows (seed ``--tok-seed``; the tokenizers' own seed spread is in
   that ablation's table);
2. codes: ``unitok export-codes`` of the train split (with flips) and of the held-out split;
3. generators (``unitok train-gen``, ``gen-tiny``, the same recipe everywhere):
   * ``depth``: the depth head over the joint tokenizer's codes (the main model);
   * ``parallel``: K independent linear heads, its backbone widened (dim 216 instead of 192) so that
     both models have the same number of parameters (4.51 M vs 4.48 M);
   * ``recon-only``: the depth-head recipe over the reconstruction-only tokenizer's codes;
   each with the generator seeds ``--seeds`` (0 and 1);
4. ``unitok eval-gen`` of each against the held-out images (Fréchet distance of EfficientNet-Lite0
   features -- not an FID --, KID, precision/recall, condition consistency with its shuffled-label
   control, copy rate, held-out NLL, and the real-vs-real and reconstruction-vs-real floors), with a
   guidance sweep for the main model.

5. a common judge for the joint vs reconstruction-only comparison: the reconstruction-only tokenizer's
   zero-shot head is untrained, so the same guidance-free samples (eval-gen's seeds) of every generator
   are also scored by the joint tokenizer's zero-shot head (``consistency_joint_judge``).

It writes ``OUT/results.json`` and ``OUT/results.md`` (mean ± standard deviation over the seeds).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZERS = {'joint': 'K8', 'recon-only': 'K8_recon-only'}      # tag of benchmarks/ablation_multicodebook.py
# The same 4.5 M-parameter budget for both heads (GeneratorModel parameter counts at 9 classes).
GENERATORS = {
    'depth': ('joint', ['model.head=depth']),
    'parallel': ('joint', ['model.head=parallel', 'model.dim=216']),
    'recon-only': ('recon-only', ['model.head=depth']),
}
RECIPE = ['data.batch_size=64', 'optim.lr=1e-3', 'model.dropout=0.1', 'model.cond_dropout=0.1', 'log_every=100',
          'image_every=0', 'data.num_workers=0']
METRICS = ('fd_effnet-lite0', 'kid_effnet-lite0', 'precision_effnet-lite0', 'recall_effnet-lite0',
           'consistency_zero_shot', 'control_zero_shot', 'consistency_classifier', 'control_classifier',
           'copy_rate', 'nn_distance_ratio')
FORMATS = {'fd_effnet-lite0': '.1f', 'kid_effnet-lite0': '.4f', 'nll': '.3f'}


def run(cmd):
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def exported(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, 'manifest.json'))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='runs/genexp')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--tok-seed', type=int, default=0)
    p.add_argument('--tok-steps', type=int, default=500)
    p.add_argument('--gen-steps', type=int, default=1500)
    p.add_argument('--samples-per-class', type=int, default=40)
    p.add_argument('--max-train', type=int, default=1800,
                   help='training images (a fixed class-balanced subset) for the probe and the copy rate')
    p.add_argument('--sweep', default='1.0,1.5,2.0,3.0', help='guidance scales of the main model')
    p.add_argument('--only', nargs='*', help='subset of the generator names: ' + ', '.join(GENERATORS))
    args = p.parse_args(argv)
    unitok = [sys.executable, '-m', 'unitok.cli']
    names = [n for n in GENERATORS if not args.only or n in args.only]
    wanted = sorted({GENERATORS[n][0] for n in names})
    start = time.time()

    # 1. tokenizers (the ablation script skips the runs that finished)
    run([sys.executable, os.path.join(HERE, 'ablation_multicodebook.py'), '--out', os.path.join(args.out, 'tokenizers'),
         '--steps', str(args.tok_steps), '--seeds', str(args.tok_seed),
         '--only', *[{'K8': 'K=8', 'K8_recon-only': 'K=8 recon-only'}[TOKENIZERS[t]] for t in wanted]])

    def tokenizer_dir(kind):
        return os.path.join(args.out, 'tokenizers', f'{TOKENIZERS[kind]}_seed{args.tok_seed}', 'model')

    def codes_dir(kind, split):
        return os.path.join(args.out, 'codes', f'{kind}_seed{args.tok_seed}', split)

    # 2. codes
    for kind in wanted:
        for split, augment in (('train', 'flip'), ('val', 'none')):
            if not exported(codes_dir(kind, split)):
                run(unitok + ['export-codes', '--model', tokenizer_dir(kind), '--data', 'builtin:emoji',
                              '--split', split, '--augment', augment, '--out', codes_dir(kind, split)])

    # 3. generators and 4. their evaluation
    results: dict[str, list[dict]] = {}
    for name in names:
        kind, overrides = GENERATORS[name]
        for seed in args.seeds:
            run_dir = os.path.join(args.out, 'gen', f'{name}_seed{seed}')
            report = os.path.join(run_dir, 'eval', 'report.json')
            if not os.path.isfile(report):
                t = time.time()
                if not os.path.isfile(os.path.join(run_dir, 'model', 'config.json')):
                    resume = ['--resume', 'latest'] if os.path.isdir(os.path.join(run_dir, 'checkpoints')) else []
                    run(unitok + ['train-gen', '--codes', codes_dir(kind, 'train'),
                                  '--val-codes', codes_dir(kind, 'val'), '--tokenizer', tokenizer_dir(kind),
                                  '--preset', 'gen-tiny', '--out', run_dir, '--steps', str(args.gen_steps),
                                  f'seed={seed}', f'eval_every={args.gen_steps}', f'ckpt_every={args.gen_steps // 3}',
                                  *RECIPE, *overrides, *resume])
                sweep = args.sweep if name == 'depth' else '1.0'
                run(unitok + ['eval-gen', '--gen', os.path.join(run_dir, 'model'), '--data', 'builtin:emoji',
                              '--codes-val', codes_dir(kind, 'val'), '--out', os.path.join(run_dir, 'eval'),
                              '--samples-per-class', str(args.samples_per_class), '--cfg', sweep, '--seed', str(seed),
                              '--max-train', str(args.max_train)])
                print(f'{name} seed {seed}: {(time.time() - t) / 60:.1f} min', flush=True)
            with open(report) as f:
                results.setdefault(name, []).append(json.load(f))

    for name in names:
        for seed, report in zip(args.seeds, results[name]):
            path = os.path.join(args.out, 'gen', f'{name}_seed{seed}', 'eval', 'joint_judge.json')
            if not os.path.isfile(path):
                value = joint_judge(os.path.join(args.out, 'gen', f'{name}_seed{seed}', 'model'),
                                    tokenizer_dir(GENERATORS[name][0]), tokenizer_dir('joint'),
                                    args.samples_per_class, seed)
                with open(path, 'w') as f:
                    json.dump(value, f)
            with open(path) as f:
                report['joint_judge'] = json.load(f)
    summary = summarise(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump({'seeds': args.seeds, 'tok_seed': args.tok_seed, 'tok_steps': args.tok_steps, 'gen_steps': args.gen_steps,
                   'samples_per_class': args.samples_per_class, 'max_train': args.max_train, 'recipe': RECIPE,
                   'generators': {n: GENERATORS[n] for n in names}, 'summary': summary,
                   'reports': results}, f, indent=2)
    table = markdown(summary, len(args.seeds))
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    print(f'total {(time.time() - start) / 60:.1f} min')


def joint_judge(gen_dir: str, tokenizer_dir: str, judge_dir: str, per_class: int, seed: int,
                chunk: int = 16) -> dict:
    """Guidance-free samples planned as ``unitok eval-gen`` plans them (same chunks and seeds), decoded
    by the generator's tokenizer, seen as uint8 images, classified by the zero-shot head of the joint
    tokenizer ``judge_dir``: ``(consistency, shuffled-label control)``."""
    import torch

    from unitok import UniTok
    from unitok.data import open_source
    from unitok.eval.generation import consistency, load_generator, sample_chunks
    from unitok.generation import generate
    from unitok.images import to_uint8_tensor
    generator, tokenizer, info = load_generator(gen_dir, tokenizer_dir)
    judge = UniTok.from_pretrained(judge_dir).eval()
    classnames = info['classnames']
    templates = getattr(open_source('builtin:emoji', 'val'), 'templates', None) or ('a photo of a {}.',)
    heads = judge.zero_shot_classifier(classnames, list(templates))
    predicted, requested = [], []
    with torch.no_grad():
        for lo, hi, chunk_seed in sample_chunks(len(classnames), per_class, chunk, seed):
            labels = torch.arange(lo, hi) // per_class
            images = tokenizer.decode(generate(generator, labels, cfg_scale=1.0, generator=chunk_seed))
            seen = to_uint8_tensor(images).float().div(127.5).sub(1)
            predicted.append((judge.encode_image(seen) @ heads.to(seen.dtype)).argmax(1))
            requested.append(labels)
    agree, control = consistency(torch.cat(predicted), torch.cat(requested), seed)
    return {'consistency_joint_judge': agree, 'control_joint_judge': control}


def _at(report: dict, scale: float) -> dict:
    return next(m for m in report['sweep'] if m['cfg_scale'] == scale)


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per generator: each metric at guidance 1 (a list over seeds), the held-out NLL, the sweep of the
    main model, and the floors / ceilings of each tokenizer."""
    out = {}
    for name, reports in results.items():
        row = {m: [_at(r, 1.0)[m] for r in reports] for m in METRICS}
        row['nll'] = [r['held_out_nll']['nll'] for r in reports]
        for key in ('consistency_joint_judge', 'control_joint_judge'):
            row[key] = [r['joint_judge'][key] for r in reports]
        row['chance'] = reports[0]['chance']
        row['floors'] = {f: {m: [r['floors'][f][m] for r in reports] for m in METRICS[:4]}
                         for f in reports[0]['floors']}
        row['ceilings'] = {c: [r['ceilings'][c] for r in reports] for c in reports[0]['ceilings']}
        scales = sorted({m['cfg_scale'] for r in reports for m in r['sweep']})
        row['sweep'] = {str(s): {m: [_at(r, s)[m] for r in reports] for m in METRICS} for s in scales}
        out[name] = row
    return out


def _cell(values, fmt='.3f'):
    if len(values) == 1:
        return format(values[0], fmt)
    return f'{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}'


def markdown(summary: dict, n_seeds: int) -> str:
    cols = METRICS + ('nll', 'consistency_joint_judge', 'control_joint_judge')
    fmt = {m: FORMATS.get(m, '.3f') for m in cols}
    lines = ['| generator (guidance 1) | ' + ' | '.join(cols) + ' |', '|---|' + '---|' * len(cols)]
    for name, row in summary.items():
        lines.append(f'| {name} | ' + ' | '.join(_cell(row[m], fmt[m]) for m in cols) + ' |')
    for name, row in summary.items():
        for floor, vals in row['floors'].items():
            lines.append(f'| floor {floor} ({GENERATORS[name][0]} tokenizer) | '
                         + ' | '.join(_cell(vals[m], fmt[m]) if m in vals else '' for m in cols) + ' |')
        if name == 'depth':
            break                          # the parallel row shares the joint tokenizers' floors
    if 'recon-only' in summary:
        for floor, vals in summary['recon-only']['floors'].items():
            lines.append(f'| floor {floor} (recon-only tokenizer) | '
                         + ' | '.join(_cell(vals[m], fmt[m]) if m in vals else '' for m in cols) + ' |')
    for name, row in summary.items():
        if len(row['sweep']) > 1:
            lines += ['', f'Guidance sweep of {name}:', '',
                      '| guidance | ' + ' | '.join(METRICS) + ' |', '|---|' + '---|' * len(METRICS)]
            for s, vals in row['sweep'].items():
                lines.append(f'| {s} | ' + ' | '.join(_cell(vals[m], fmt[m]) for m in METRICS) + ' |')
    lines += ['', 'Ceilings (held-out real images): ' + '; '.join(
        f'{name}: ' + ', '.join(f'{c} {_cell(v)}' for c, v in row['ceilings'].items())
        for name, row in summary.items()), f'(chance {next(iter(summary.values()))["chance"]:.3f}; '
        f'mean ± standard deviation over {n_seeds} seeds)']
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
