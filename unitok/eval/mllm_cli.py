"""``unitok eval-mllm``: evaluate a multimodal LLM (understanding, controls, text-to-image); writes
report.json + report.html.

    unitok eval-mllm --mllm runs/mllm/model --data builtin:emoji --out runs/mllm/eval
    unitok eval-mllm --mllm runs/mllm/model --data builtin:emoji --codes-val codes/val --codes-train codes/train \\
        --cfg 1.0,2.0 --max-items 190 --out eval/

Without --codes-val the held-out split is exported with the model's tokenizer into OUT/codes-val.
Every model pass runs on fixed chunks of --chunk-size items, so the numbers do not depend on
--batch-size (see unitok.eval.mllm). One process.
"""
from __future__ import annotations

import argparse

from .features import EXTRACTORS
from .generation_cli import scale_list


def run(args) -> int:
    import torch

    from ..utils.io import check_writable_dir
    from .mllm import MLLMEvalConfig, run_mllm_evaluation
    check_writable_dir(args.out)                    # fail before the evaluation, not after it
    cfg = MLLMEvalConfig(question=args.question, category_question=args.category_question, draw=args.draw,
                         label_set=args.label_set, max_items=args.max_items, train_items=args.train_items,
                         max_new_tokens=args.max_new_tokens, cfg_scales=args.cfg,
                         samples_per_item=args.samples_per_item, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, chunk_size=args.chunk_size, batch_size=args.batch_size,
                         extractor=args.extractor, extractor_weights=args.extractor_weights)
    cfg.validate()                                  # bad settings fail before anything loads
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
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


def register(sub) -> None:
    p = sub.add_parser('eval-mllm', help='evaluate a multimodal LLM (LLM zero-shot, names, image controls, '
                       'text-to-image consistency / FD / precision / recall with floors)',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument('--temperature', type=float, default=1.0)
    p.add_argument('--top-k', type=int, default=0)
    p.add_argument('--top-p', type=float, default=1.0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--chunk-size', type=int, default=8, help='items per model call (decides the samples)')
    p.add_argument('--batch-size', type=int, default=32, help='feature-extractor batches (changes no number)')
    p.add_argument('--extractor', default='effnet-lite0', choices=EXTRACTORS)
    p.add_argument('--extractor-weights', help="local weights of the 'inception' / 'dinov2' extractor")
    p.add_argument('--device', help='default: cuda when available, else cpu')
    p.set_defaults(fn=run)
