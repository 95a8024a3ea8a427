"""``unitok train-gen`` and ``unitok generate``: train a generator on exported codes, sample images.

    unitok export-codes --model TOKENIZER --data builtin:emoji --out codes/train
    unitok export-codes --model TOKENIZER --data builtin:emoji --split val --out codes/val
    unitok train-gen --codes codes/train --val-codes codes/val --tokenizer TOKENIZER --preset gen-tiny \\
        --out runs/gen --steps 2000
    unitok train-gen --out runs/gen --resume latest
    unitok generate --gen runs/gen/model --class "animals & nature" --n 16 --cfg 1.5 --seed 0 --out grid.png
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.cli import add_run_arguments
    p.add_argument('--codes', help='directory of exported training codes (unitok export-codes --out)')
    p.add_argument('--val-codes', help='directory of exported held-out codes (held-out NLL)')
    p.add_argument('--tokenizer', help='the UniTok model that exported the codes (sample images, text conditions)')
    p.add_argument('--preset', help='generator preset: gen-tiny, gen-B, gen-L, gen-XL, gen-XXL')
    add_run_arguments(p, 'a GenTrainConfig mirror')


def _assignments(args) -> list[str]:
    direct = {'data.train': args.codes, 'data.val': args.val_codes, 'tokenizer': args.tokenizer,
              'preset': args.preset, 'out': args.out, 'steps': args.steps, 'data.batch_size': args.batch_size}
    return [f'{k}={v}' for k, v in direct.items() if v is not None] + list(args.overrides)


def run_train(args) -> int:
    from ..train.cli import resolve_config, train
    from ..train.tasks.generator import GenTrainConfig
    return train(resolve_config(args, GenTrainConfig, assignments=_assignments(args)), args.resume)


def _class_labels(names: list[str] | None, wanted: list[str] | None, n: int) -> torch.Tensor:
    if not names:
        raise ValueError('this generator has no class names; it is text-conditional (use --prompt)')
    if not wanted:
        return torch.arange(len(names)).repeat_interleave(max(1, n // len(names)))[:max(n, len(names))]
    labels = []
    for w in wanted:
        if w in names:
            labels.append(names.index(w))
        elif w.isdigit() and int(w) < len(names):
            labels.append(int(w))
        else:
            raise ValueError(f'unknown class {w!r}; the classes are: ' + ', '.join(repr(c) for c in names))
    return torch.tensor(labels).repeat_interleave(n)


def run_generate(args) -> int:
    from ..checkpoint import CheckpointError
    from ..eval.generation import load_generator
    from ..generation import generate, text_condition
    from ..utils.io import check_writable_file
    if getattr(args, 'mllm', None):
        from ..mllm.cli import run_generate as run_mllm
        return run_mllm(args)
    if args.n < 1:
        raise ValueError(f'--n must be >= 1, got {args.n}')
    check_writable_file(args.out, what='output image')
    # the generator, its generation.json, and the tokenizer it was trained on (checked against the codes)
    model, tokenizer, info = load_generator(args.gen, args.tokenizer, args.device)
    c = model.config
    if (tokenizer.config.num_codebooks, tokenizer.config.codebook_size) != (c.num_codebooks, c.codebook_size):
        raise CheckpointError(f'the tokenizer has {tokenizer.config.num_codebooks} x {tokenizer.config.codebook_size} '
                              f'codes, the generator {c.num_codebooks} x {c.codebook_size}')
    if c.cond == 'class':
        if args.prompt:
            raise ValueError('this generator is class-conditional: use --class NAME, not --prompt')
        labels = _class_labels(info.get('classnames'), args.classes, args.n).to(args.device)
        cond, rows = labels, [labels[i:i + args.n] for i in range(0, len(labels), args.n)]
    else:
        if not args.prompt:
            raise ValueError('this generator is text-conditional: pass --prompt "..."')
        prompts = [p for p in args.prompt for _ in range(args.n)]
        cond, rows = text_condition(tokenizer, prompts), [None] * len(args.prompt)
    with torch.no_grad():
        codes = generate(model, cond, cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=args.seed)
        images = tokenizer.decode(codes)
    per_row = args.n if len(rows) > 1 else min(args.n, 8)
    extra = {'labels': cond.cpu().numpy()} if c.cond == 'class' else {'prompts': np.array(prompts)}
    write_samples(args, images, codes, per_row, **extra)
    return 0


def write_samples(args, images: torch.Tensor, codes: torch.Tensor, per_row: int, **extra) -> None:
    """``args.out``: a grid PNG of ``images`` (``per_row`` a row); beside it, the same name with ``.npz``:
    the codes (uint16), the guidance scale, the seed and ``extra`` arrays (labels or prompts)."""
    from ..images import make_grid
    from ..utils.io import atomic_write
    grid = make_grid([images[i:i + per_row] for i in range(0, len(images), per_row)])
    stem = os.path.splitext(args.out)[0]
    atomic_write(args.out, lambda f: grid.save(f, format='PNG'), what='output image')
    meta = dict(codes=codes.cpu().numpy().astype(np.uint16), cfg=np.float64(args.cfg), seed=np.int64(args.seed),
                **extra)
    atomic_write(stem + '.npz', lambda f: np.savez(f, **meta), what='codes')
    print(f'wrote {args.out} ({len(images)} samples) and {stem}.npz')


def register(sub) -> None:
    p = sub.add_parser('train-gen', help='train an autoregressive generator on exported codes',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(fn=run_train)
    g = sub.add_parser('generate', help='sample images from a trained generator',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument('--gen', help='generator model directory (RUN/model of unitok train-gen)')
    which.add_argument('--mllm', help='multimodal LLM directory (RUN/model of unitok train-mllm); takes --prompt')
    g.add_argument('--llm', help='with --mllm: the LLM to use instead of the referenced one')
    g.add_argument('--tokenizer', help='UniTok model that decodes the codes (default: the one it was trained with)')
    g.add_argument('--class', dest='classes', action='append', help='class name (repeatable; default: every class)')
    g.add_argument('--prompt', action='append', help='text prompt (text-conditional generators; repeatable)')
    g.add_argument('--n', type=int, default=8, help='samples per class or prompt')
    g.add_argument('--cfg', type=float, default=1.0, help='classifier-free guidance scale (1: guidance-free)')
    g.add_argument('--temperature', type=float, default=1.0)
    g.add_argument('--top-k', type=int, default=0)
    g.add_argument('--top-p', type=float, default=1.0)
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', default='cpu')
    g.add_argument('--out', required=True, help='grid PNG; the codes go to the same name with .npz')
    g.set_defaults(fn=run_generate)
