"""``unitok eval-gen``: evaluate a class-conditional generator; writes report.json + report.html.

    unitok eval-gen --gen runs/gen/model --data builtin:emoji --out runs/gen/eval
    unitok eval-gen --gen runs/gen/model --tokenizer runs/tok/model --data builtin:emoji \\
        --codes-val codes/val --samples-per-class 50 --cfg 1.0,1.5,2.0,3.0 --extractor effnet-lite0 --out eval/
    torchrun --nproc_per_node 8 -m unitok.cli eval-gen ...     # samples and images sharded over processes

Samples are seeded per chunk of --chunk-size samples, so the numbers do not depend on --batch-size
or on the number of processes (see unitok.eval.generation).
"""
from __future__ import annotations

import argparse

from .features import EXTRACTORS


def scale_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated guidance scales, ``'1.0,2.0'`` -> ``(1.0, 2.0)``."""
    try:
        values = tuple(float(v) for v in text.split(',') if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated guidance scales like 1.0,1.5,2.0, got {text!r}') \
            from None
    if not values:
        raise argparse.ArgumentTypeError('expected at least one guidance scale')
    return values


def run(args) -> int:
    import os

    import torch

    from ..utils import distributed as D
    from ..utils.io import check_writable_dir
    from .generation import GenEvalConfig, run_generator_evaluation
    check_writable_dir(args.out)                    # fail before the evaluation, not after it
    cfg = GenEvalConfig(samples_per_class=args.samples_per_class, cfg_scales=args.cfg, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, chunk_size=args.chunk_size,
                        batch_size=args.batch_size, extractors=tuple(args.extractor),
                        inception_weights=args.inception_weights, dinov2_weights=args.dinov2_weights,
                        max_real=args.max_real, max_train=args.max_train,
                        templates=tuple(args.template) if args.template else None)
    cfg.validate()                                  # bad settings fail before anything loads
    info = D.init_distributed()
    device = args.device or (f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}' if torch.cuda.is_available() else 'cpu')
    try:
        report = run_generator_evaluation(args.gen, args.data, args.out, cfg, tokenizer_path=args.tokenizer,
                                          codes_val=args.codes_val, device=device, progress=True)
    finally:
        D.shutdown()
    if info.is_main:
        first = report['primary_extractor']
        keys = (f'fd_{first}', f'kid_{first}', f'precision_{first}', f'recall_{first}', 'consistency_zero_shot',
                'consistency_classifier', 'control_classifier', 'copy_rate')
        for m in report['sweep']:
            print(f'cfg {m["cfg_scale"]:g}: ' + '  '.join(f'{k} {m[k]:.4g}' for k in keys))
        for name, m in report['floors'].items():
            print(f'floor {name}: ' + '  '.join(f'{k} {m[k]:.4g}' for k in keys[:4]))
        c, n = report['ceilings'], report['held_out_nll']
        print(f'chance {report["chance"]:.4g}  zero-shot on held-out {c["zero_shot_held_out_accuracy"]:.4g}  '
              f'probe on held-out {c["classifier_held_out_accuracy"]:.4g}  held-out NLL {n["nll"]:.4g} nats')
        print(f'report: {args.out}/report.html')
    return 0


def register(sub) -> None:
    p = sub.add_parser('eval-gen', help='evaluate a class-conditional generator (FD/KID/precision/recall, '
                       'condition consistency, copy rate, held-out NLL, floors)',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--gen', required=True, help='generator model directory (RUN/model of unitok train-gen)')
    p.add_argument('--tokenizer', help='UniTok model whose codes it models (default: the one in generation.json)')
    p.add_argument('--data', required=True, help="data spec with 'train' and 'val' splits, e.g. builtin:emoji")
    p.add_argument('--codes-val', help='exported held-out codes for the NLL (default: encode the held-out images)')
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--samples-per-class', type=int, default=50)
    p.add_argument('--cfg', type=scale_list, default=(1.0, 1.5, 2.0, 3.0), help='guidance scales, e.g. 1.0,1.5,2.0,3.0')
    p.add_argument('--temperature', type=float, default=1.0)
    p.add_argument('--top-k', type=int, default=0)
    p.add_argument('--top-p', type=float, default=1.0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--chunk-size', type=int, default=16, help='samples per generate() call (decides the samples)')
    p.add_argument('--batch-size', type=int, default=32, help='decoding and feature batches (changes no number)')
    p.add_argument('--extractor', nargs='+', default=['effnet-lite0'], choices=EXTRACTORS,
                   help='feature extractors; the first also feeds the probe and the copy rate')
    p.add_argument('--inception-weights')
    p.add_argument('--dinov2-weights')
    p.add_argument('--max-real', type=int, help='held-out images: a fixed class-balanced subset of this size')
    p.add_argument('--max-train', type=int, help='train images: a fixed class-balanced subset of this size')
    p.add_argument('--template', action='append', help='zero-shot prompt template with {} (repeatable)')
    p.add_argument('--device', help='default: cuda when available, else cpu')
    p.set_defaults(fn=run)
