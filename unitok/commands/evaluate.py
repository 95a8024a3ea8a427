"""Evaluation from the shell: ``unitok eval`` (a tokenizer), ``eval-gen`` (a generator), ``eval-mllm``
(a multimodal LLM); each writes report.json + report.html and prints the headline numbers."""
from __future__ import annotations

import os

import torch

from .. import eval as evaluation
from ..eval import ALL_METRICS, DEFAULT_METRICS, EvalConfig
from ..eval.features import EXTRACTORS
from ..eval.generation import GenEvalConfig, run_generator_evaluation
from ..eval.mllm import MLLMEvalConfig, run_mllm_evaluation
from ..utils import distributed as D
from ..utils.io import check_writable_dir
from .args import add_command, add_sampling_args, default_device, scale_list


# ---------------------------------------------------------------------- unitok eval
EVAL_DOC = """``unitok eval``: evaluate a tokenizer and write report.json + report.html.

    unitok eval --model runs/tiny/model --data builtin:emoji --out runs/tiny/eval
    unitok eval --model unitok.pth --data folder:/data/imagenet --extractor inception \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out eval/
    torchrun --nproc_per_node 8 -m unitok.cli eval ...                    # data sharded over processes
    unitok eval --compare runs/a/eval runs/b/eval --out cmp/              # side by side
"""


INCEPTION_HELP = ('FID Inception-v3 weights weights-inception-2015-12-05-6726825d.pth: the file, its folder or the '
                  'hub id FoundationVision/unitok_external')
DINO_HELP = 'DINOv2 ViT-S/14 weights dinov2_vits14_pretrain.pth: the file, its folder or the hub id'


def register_eval(sub) -> None:
    p = add_command(sub, 'eval', 'evaluate a tokenizer (rFID, PSNR/SSIM, zero-shot, codebook health)', EVAL_DOC)
    p.add_argument('--model', help='model directory, hub id or official .pth')
    p.add_argument('--data', help='data spec: builtin:emoji, folder:DIR, shards/{000..009}.tar')
    p.add_argument('--split', default='val', help="split of the data spec (default 'val')")
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--metrics', nargs='+', default=list(DEFAULT_METRICS), choices=ALL_METRICS)
    p.add_argument('--extractor', nargs='+', default=['effnet-lite0'], choices=EXTRACTORS)
    p.add_argument('--inception-weights', help=INCEPTION_HELP)
    p.add_argument('--dinov2-weights', help=DINO_HELP)
    p.add_argument('--lpips-weights', help='VGG16 weights for the lpips metric: torchvision vgg16-397923af.pth, or '
                   'lpips_with_vgg.pth (the file, its folder or the hub id FoundationVision/unitok_external)')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--resize', default='crop', choices=['crop', 'native'])
    p.add_argument('--size', type=int, help='evaluation resolution (default: the model size)')
    p.add_argument('--max-samples', type=int,
                   help='evaluate a fixed class-balanced subset of this many images (seeded; see unitok.eval)')
    p.add_argument('--template', action='append', help='zero-shot prompt template with {} (repeatable)')
    p.add_argument('--name', help='model name in the report')
    p.add_argument('--compare', nargs=2, metavar=('A', 'B'), help='two evaluation directories to put side by side')
    p.set_defaults(fn=run_eval)


def run_eval(args) -> int:
    check_writable_dir(args.out)          # fail before the evaluation, not after it
    if args.compare:
        path = evaluation.compare(args.compare, args.out)      # through the package: tests replace it
        print(f'comparison written to {path}')
        return 0
    if not args.model or not args.data:
        raise ValueError('unitok eval needs --model and --data (or --compare DIR DIR)')
    info = D.init_distributed()
    cfg = EvalConfig(metrics=tuple(args.metrics), extractors=tuple(args.extractor),
                     inception_weights=args.inception_weights, dinov2_weights=args.dinov2_weights,
                     lpips_weights=args.lpips_weights, batch_size=args.batch_size, resize=args.resize,
                     image_size=args.size, max_samples=args.max_samples,
                     templates=tuple(args.template) if args.template else None)
    cfg.validate()                        # bad metric/weight combinations fail before the model loads
    try:
        report = evaluation.run_evaluation(args.model, args.data, args.out, cfg, split=args.split, name=args.name,
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


# ---------------------------------------------------------------------- unitok eval-gen
EVAL_GEN_DOC = """``unitok eval-gen``: evaluate a class-conditional generator; writes report.json + report.html.

    unitok eval-gen --gen runs/gen/model --data builtin:emoji --out runs/gen/eval
    unitok eval-gen --gen runs/gen/model --tokenizer runs/tok/model --data builtin:emoji \\
        --codes-val codes/val --samples-per-class 50 --cfg 1.0,1.5,2.0,3.0 --extractor effnet-lite0 --out eval/
    torchrun --nproc_per_node 8 -m unitok.cli eval-gen ...     # samples and images sharded over processes

Samples are seeded per chunk of --chunk-size samples, so the numbers do not depend on --batch-size
or on the number of processes (see unitok.eval.generation). The sampled codes are kept in
OUT/samples/cfg-<scale>.npz; a rerun with the same generator and sampling settings measures them again
without sampling.
"""


def register_eval_gen(sub) -> None:
    p = add_command(sub, 'eval-gen', 'evaluate a class-conditional generator (FD/KID/precision/recall, '
                    'condition consistency, copy rate, held-out NLL, floors)', EVAL_GEN_DOC)
    p.add_argument('--gen', required=True, help='generator model directory (RUN/model of unitok train-gen)')
    p.add_argument('--tokenizer', help='UniTok model whose codes it models (default: the one in generation.json)')
    p.add_argument('--data', required=True, help="data spec with 'train' and 'val' splits, e.g. builtin:emoji")
    p.add_argument('--codes-val', help='exported held-out codes for the NLL (default: encode the held-out images)')
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--samples-per-class', type=int, default=50)
    p.add_argument('--cfg', type=scale_list, default=(1.0, 1.5, 2.0, 3.0), help='guidance scales, e.g. 1.0,1.5,2.0,3.0')
    add_sampling_args(p)
    p.add_argument('--chunk-size', type=int, default=16, help='samples per generate() call (decides the samples)')
    p.add_argument('--batch-size', type=int, default=32, help='decoding and feature batches (changes no number)')
    p.add_argument('--extractor', nargs='+', default=['effnet-lite0'], choices=EXTRACTORS,
                   help='feature extractors; the first also feeds the probe and the copy rate')
    p.add_argument('--inception-weights', help=INCEPTION_HELP)
    p.add_argument('--dinov2-weights', help=DINO_HELP)
    p.add_argument('--max-real', type=int, help='held-out images: a fixed class-balanced subset of this size')
    p.add_argument('--max-train', type=int, help='train images: a fixed class-balanced subset of this size')
    p.add_argument('--template', action='append', help='zero-shot prompt template with {} (repeatable)')
    p.add_argument('--device', help='default: cuda when available, else cpu')
    p.set_defaults(fn=run_eval_gen)


def run_eval_gen(args) -> int:
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


# ---------------------------------------------------------------------- unitok eval-mllm
EVAL_MLLM_DOC = """``unitok eval-mllm``: evaluate a multimodal LLM (understanding, controls, text-to-image); writes
report.json + report.html.

    unitok eval-mllm --mllm runs/mllm/model --data builtin:emoji --out runs/mllm/eval
    unitok eval-mllm --mllm runs/mllm/model --data builtin:emoji --codes-val codes/val --codes-train codes/train \\
        --cfg 1.0,2.0 --max-items 190 --out eval/

Without --codes-val the held-out split is exported with the model's tokenizer into OUT/codes-val.
Every model pass runs on fixed chunks of --chunk-size items, so the numbers do not depend on
--batch-size (see unitok.eval.mllm). One process.
"""


def register_eval_mllm(sub) -> None:
    p = add_command(sub, 'eval-mllm', 'evaluate a multimodal LLM (LLM zero-shot, names, image controls, '
                    'text-to-image consistency / FD / precision / recall with floors)', EVAL_MLLM_DOC)
    p.add_argument('--mllm', required=True, help='MLLM directory (RUN/model of unitok train-mllm)')
    p.add_argument('--data', required=True, help="data spec with a 'val' split, e.g. builtin:emoji")
    p.add_argument('--codes-val', help='exported held-out codes (default: export the val split into OUT/codes-val)')
    p.add_argument('--codes-train', help='exported training codes for train_name_* (default: the training run\'s)')
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--llm', help='another LLM spec for the referenced one (checked against the saved digests)')
    p.add_argument('--cfg', type=scale_list, default=(1.0, 2.0), help='text-to-image guidance scales, e.g. 1.0,2.0')
    p.add_argument('--max-items', type=int, help='held-out items: a fixed class-balanced subset of this size')
    p.add_argument('--train-items', type=int, default=32)
    p.add_argument('--samples-per-item', type=int, default=1)
    p.add_argument('--max-new-tokens', type=int, default=24)
    p.add_argument('--question', help="name question (default: the model's training.json)")
    p.add_argument('--category-question', help="question of the LLM classification (default: training.json's)")
    p.add_argument('--draw', help="text-to-image template with {} (default: training.json's)")
    p.add_argument('--label-set', help="label set of the codes giving the categories (default: training.json's)")
    add_sampling_args(p)
    p.add_argument('--chunk-size', type=int, default=8, help='items per model call (decides the samples)')
    p.add_argument('--batch-size', type=int, default=32, help='feature-extractor batches (changes no number)')
    p.add_argument('--extractor', default='effnet-lite0', choices=EXTRACTORS)
    p.add_argument('--extractor-weights', help="weights of the 'inception' / 'dinov2' extractor: the file, its "
                   'folder or the hub id FoundationVision/unitok_external')
    p.add_argument('--device', help='default: cuda when available, else cpu')
    p.set_defaults(fn=run_eval_mllm)


def run_eval_mllm(args) -> int:
    check_writable_dir(args.out)                    # fail before the evaluation, not after it
    cfg = MLLMEvalConfig(question=args.question, category_question=args.category_question, draw=args.draw,
                         label_set=args.label_set, max_items=args.max_items, train_items=args.train_items,
                         max_new_tokens=args.max_new_tokens, cfg_scales=args.cfg,
                         samples_per_item=args.samples_per_item, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, chunk_size=args.chunk_size, batch_size=args.batch_size,
                         extractor=args.extractor, extractor_weights=args.extractor_weights)
    cfg.validate()                                  # bad settings fail before anything loads
    device = args.device or default_device()
    r = run_mllm_evaluation(args.mllm, args.data, args.out, cfg, codes_val=args.codes_val,
                            codes_train=args.codes_train, llm=args.llm, device=device, progress=True)
    print(f'{r["items"]} held-out items, {r["classes"]} categories: chance {r["chance"]:.4g}, majority '
          f'{r["majority_rate"]:.4g}')
    print(f'LLM zero-shot top-1 {r["llm_zero_shot_top1"]:.4g}  tokenizer zero-shot top-1 '
          f'{r["tokenizer_zero_shot_top1"]:.4g}  controls: swapped {r["control_swapped_top1"]:.4g} '
          f'(follows the swapped image {r["control_swapped_partner_top1"]:.4g}), noise {r["control_noise_top1"]:.4g}')
    line = f'names: exact match {r["name_exact_match"]:.4g}, token F1 {r["name_token_f1"]:.4g}'
    if 'train_name_exact_match' in r:
        line += f' (train: {r["train_name_exact_match"]:.4g}, {r["train_name_token_f1"]:.4g})'
    print(line)
    e = args.extractor
    for m in r['t2i']:
        print(f'text-to-image cfg {m["cfg_scale"]:g}: consistency {m["t2i_consistency"]:.4g} (control '
              f'{m["t2i_control"]:.4g})  fd_{e} {m[f"fd_{e}"]:.4g}  precision {m[f"precision_{e}"]:.4g}  '
              f'recall {m[f"recall_{e}"]:.4g}')
    for name, m in r['floors'].items():
        print(f'floor {name}: fd_{e} {m[f"fd_{e}"]:.4g}  precision {m[f"precision_{e}"]:.4g}  '
              f'recall {m[f"recall_{e}"]:.4g}')
    print(f'report: {args.out}/report.html')
    return 0
