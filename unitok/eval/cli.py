"""``unitok eval``: evaluate a tokenizer and write report.json + report.html.

    unitok eval --model runs/tiny/model --data builtin:emoji --out runs/tiny/eval
    unitok eval --model unitok.pth --data folder:/data/imagenet --extractor inception \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out eval/
    torchrun --nproc_per_node 8 -m unitok.cli eval ...                    # data sharded over processes
    unitok eval --compare runs/a/eval runs/b/eval --out cmp/              # side by side
"""
from __future__ import annotations

import argparse

from .evaluator import ALL_METRICS, DEFAULT_METRICS, EvalConfig
from .features import EXTRACTORS


def run(args) -> int:
    from . import compare, run_evaluation
    from ..utils.io import check_writable_dir
    check_writable_dir(args.out)          # fail before the evaluation, not after it
    if args.compare:
        path = compare(args.compare, args.out)
        print(f'comparison written to {path}')
        return 0
    if not args.model or not args.data:
        raise ValueError('unitok eval needs --model and --data (or --compare DIR DIR)')
    from ..utils import distributed as D
    info = D.init_distributed()
    cfg = EvalConfig(metrics=tuple(args.metrics), extractors=tuple(args.extractor),
                     inception_weights=args.inception_weights, dinov2_weights=args.dinov2_weights,
                     lpips_weights=args.lpips_weights, batch_size=args.batch_size, resize=args.resize,
                     image_size=args.size, max_samples=args.max_samples,
                     templates=tuple(args.template) if args.template else None)
    cfg.validate()                        # bad metric/weight combinations fail before the model loads
    try:
        report = run_evaluation(args.model, args.data, args.out, cfg, split=args.split, name=args.name,
                                progress=True)
    finally:
        D.shutdown()
    if info.is_main:
        keys = [k for k in ('psnr', 'ssim', 'lpips', *[f'rfid_{e}' for e in cfg.extractors], 'zero_shot_top1',
                            'zero_shot_top5', 'recall@1', 'codebook_usage', 'codebook_perplexity', 'samples',
                            'classes_covered', 'skipped') if k in report]
        print('  '.join(f'{k} {report[k]:.4g}' if isinstance(report[k], float) else f'{k} {report[k]}' for k in keys))
        print(f'report: {args.out}/report.html')
    return 0


def register(sub) -> None:
    p = sub.add_parser('eval', help='evaluate a tokenizer (rFID, PSNR/SSIM, zero-shot, codebook health)',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='model directory, hub id or official .pth')
    p.add_argument('--data', help='data spec: builtin:emoji, folder:DIR, shards/{000..009}.tar')
    p.add_argument('--split', default='val', help="split of the data spec (default 'val')")
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--metrics', nargs='+', default=list(DEFAULT_METRICS), choices=ALL_METRICS)
    p.add_argument('--extractor', nargs='+', default=['effnet-lite0'], choices=EXTRACTORS)
    p.add_argument('--inception-weights')
    p.add_argument('--dinov2-weights')
    p.add_argument('--lpips-weights', help='VGG16 weights for the lpips metric')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--resize', default='crop', choices=['crop', 'native'])
    p.add_argument('--size', type=int, help='evaluation resolution (default: the model size)')
    p.add_argument('--max-samples', type=int,
                   help='evaluate a fixed class-balanced subset of this many images (seeded; see unitok.eval)')
    p.add_argument('--template', action='append', help='zero-shot prompt template with {} (repeatable)')
    p.add_argument('--name', help='model name in the report')
    p.add_argument('--compare', nargs=2, metavar=('A', 'B'), help='two evaluation directories to put side by side')
    p.set_defaults(fn=run)
