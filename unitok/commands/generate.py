"""Generation from the shell: ``unitok export-codes`` (a data source -> code shards), ``train-gen`` (a
generator on them) and ``generate`` (images from a generator, or from a multimodal LLM with ``--mllm``)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..codes import check_agreement, code_space, tokenizer_identity
from ..data.files import default_workers
from ..eval.generation import load_generator
from ..generation import ExportConfig, export_codes, generate, text_condition
from ..images import make_grid
from ..model import UniTok
from ..modules.text import check_fits
from ..precision import INFERENCE_PRECISIONS
from ..train.tasks.generator import GenTrainConfig
from ..utils import distributed as D
from ..utils.io import atomic_write, check_writable_file
from ..utils.throughput import Throughput
from .args import (add_codes_arguments, add_command, add_precision_arg, add_run_arguments, add_sampling_args,
                   default_device)
from .mllm import add_llm_arguments, load_mllm
from .train import assignments, resolve_config, run_training

EXPORT_DOC = """``unitok export-codes``: tokenize a data source into memory-mapped code shards (see :mod:`.codes`).

    unitok export-codes --model TOKENIZER --data builtin:emoji --out codes/emoji
    unitok export-codes --model TOKENIZER --data 'shards/{000000..000099}.tar' --out codes/x --augment flip,tencrop
    torchrun --nproc_per_node 8 -m unitok.cli export-codes --model TOKENIZER --data folder:DIR --out codes/y

Rerunning the same command after an interruption keeps the finished shards and does the rest.
"""

GEN_DOC = """``unitok train-gen`` and ``unitok generate``: train a generator on exported codes, sample images.

    unitok export-codes --model TOKENIZER --data builtin:emoji --out codes/train
    unitok export-codes --model TOKENIZER --data builtin:emoji --split val --out codes/val
    unitok train-gen --codes codes/train --val-codes codes/val --tokenizer TOKENIZER --preset gen-tiny \\
        --out runs/gen --steps 2000
    unitok train-gen --out runs/gen --resume latest
    unitok generate --gen runs/gen/model --class "animals & nature" --n 16 --cfg 1.5 --seed 0 --out grid.png
"""


# ---------------------------------------------------------------------- unitok export-codes
def run_export(args) -> int:
    cfg = ExportConfig(data=args.data, split=args.split, augment=args.augment, precision=args.precision,
                       shard_size=args.shard_size, limit=args.limit, batch_size=args.batch_size, workers=args.workers)
    info = D.init_distributed(args.device)
    try:
        model = UniTok.from_pretrained(args.model, **INFERENCE_PRECISIONS[args.precision]).to(info.device)
        result = export_codes(model, cfg, args.out, progress=True)
        stats = D.all_gather_object((result.images, result.throughput))
    except BaseException:
        D.abort()            # do not wait in a barrier for ranks that will never arrive
        raise
    D.shutdown()
    if info.is_main:
        _print_export(args, result.manifest, stats, info.world_size)
    return 0


def _print_export(args, m: dict, stats: list, world_size: int) -> None:
    tok = m['tokenizer']
    images, speed = sum(s[0] for s in stats), Throughput.combine([s[1] for s in stats])
    shape = (m['num_items'], m['num_views'], tok['num_codebooks'], *tok['grid'])
    print(f'exported {m["num_items"]} image(s) -> {args.out}: codes {shape} uint16 in {len(m["shards"])} '
          f'shard(s), views {m["views"]}')
    if images:
        per_rank = ' + '.join(str(s[0]) for s in stats)
        print(f'{images} image(s) encoded now ({world_size} process(es): {per_rank}; {args.workers} loader '
              f'worker(s) each); {m["num_items"] - images} kept from earlier runs')
        print(speed.summary() + ('' if world_size == 1 else ' (mean over processes)'))
    if m['skipped']:
        names = ', '.join(s['key'] for s in m['skipped'][:10])
        more = f' and {len(m["skipped"]) - 10} more' if len(m['skipped']) > 10 else ''
        print(f'skipped {len(m["skipped"])} unreadable image(s) (listed in manifest.json): {names}{more}')


def register_export(sub) -> None:
    p = add_command(sub, 'export-codes', 'tokenize a data source into code shards for generator training',
                    EXPORT_DOC)
    p.add_argument('--model', required=True, help='tokenizer: model directory, hub id or official .pth')
    p.add_argument('--data', required=True, help='data spec: builtin:emoji, folder:DIR, shards/{000..099}.tar')
    p.add_argument('--out', required=True, help='codes directory (created; a rerun resumes it)')
    p.add_argument('--split', default='train', help='split of the data source (default: train)')
    p.add_argument('--augment', default='none',
                   help='extra views after the centre crop, comma-separated: flip, tencrop (default: none)')
    p.add_argument('--batch-size', type=int, default=32, help='images per encoder call (default: 32)')
    p.add_argument('--shard-size', type=int, default=1024, help='images per shard (default: 1024)')
    p.add_argument('--limit', type=int, default=None, help='export only the first N items (map-style sources)')
    p.add_argument('--workers', type=int, default=default_workers(),
                   help='processes decoding images while the encoder runs (default: one per '
                        'core beside this process, at most 4; now %(default)s)')
    add_precision_arg(p)
    p.add_argument('--device', default=default_device())
    p.set_defaults(fn=run_export)


# ---------------------------------------------------------------------- unitok train-gen
def run_train(args) -> int:
    given = assignments(args, {'data.train': args.codes, 'data.val': args.val_codes, 'tokenizer': args.tokenizer,
                               'preset': args.preset, 'out': args.out, 'steps': args.steps,
                               'data.batch_size': args.batch_size})
    return run_training(resolve_config(args, GenTrainConfig, assignments=given), args.resume)


def register_train(sub) -> None:
    p = add_command(sub, 'train-gen', 'train an autoregressive generator on exported codes', GEN_DOC)
    add_codes_arguments(p, 'directory of exported training codes (unitok export-codes --out)',
                        'directory of exported held-out codes (held-out NLL)',
                        'the UniTok model that exported the codes (sample images, text conditions)')
    p.add_argument('--preset', help='generator preset: gen-tiny, gen-B, gen-L, gen-XL, gen-XXL')
    add_run_arguments(p, 'a GenTrainConfig mirror')
    p.set_defaults(fn=run_train)


# ---------------------------------------------------------------------- unitok generate
def _class_labels(names: list[str] | None, wanted: list[str] | None, n: int, num_classes: int) -> torch.Tensor:
    if not names:                         # class-conditional, but its generation.json (the names) is missing
        names = [str(i) for i in range(num_classes)]
        if wanted and not all(w.isdigit() for w in wanted):
            raise ValueError(f'this class-conditional generator has no class names (no generation.json beside it): '
                             f'pass --class with class indices 0..{num_classes - 1}')
    if not wanted:
        return torch.arange(len(names)).repeat_interleave(n)        # n per class, a row each
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
    if args.mllm:
        return _generate_with_mllm(args)
    if args.n < 1:
        raise ValueError(f'--n must be >= 1, got {args.n}')
    check_sample_outputs(args.out)
    # the generator, its generation.json, and the tokenizer it was trained on (checked against the codes)
    model, tokenizer, info = load_generator(args.gen, args.tokenizer, args.device)
    c = model.config
    check_agreement(code_space(c), tokenizer, where='the generator', consumer='the tokenizer',
                    there='in the generator', skip=('grid',), error=CheckpointError,
                    fix='not the tokenizer of its codes')
    if c.cond == 'class':
        if args.prompt:
            raise ValueError('this generator is class-conditional: use --class NAME, not --prompt')
        labels = _class_labels(info.get('classnames'), args.classes, args.n, c.num_classes).to(args.device)
        cond, rows = labels, [labels[i:i + args.n] for i in range(0, len(labels), args.n)]
    else:
        if not args.prompt:
            raise ValueError('this generator is text-conditional: pass --prompt "..."')
        check_fits(args.prompt, tokenizer.config.text_context_length, what='--prompt')
        prompts = [p for p in args.prompt for _ in range(args.n)]
        cond, rows = text_condition(tokenizer, prompts), [None] * len(args.prompt)
    prefix = c.class_tokens if c.cond == 'class' else c.text_len
    check_sample_memory(len(labels) if c.cond == 'class' else len(prompts), tokenizer.config.image_size,
                        kv_bytes(c.depth, c.dim, prefix + c.grid[0] * c.grid[1], args.cfg), args.device)
    with torch.no_grad():
        codes = generate(model, cond, cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=args.seed)
        images = tokenizer.decode(codes)
    per_row = args.n if len(rows) > 1 else min(args.n, 8)
    extra = {'labels': cond.cpu().numpy()} if c.cond == 'class' else {'prompts': np.array(prompts)}
    write_samples(args, images, codes, per_row, tokenizer, **extra)
    return 0


def _generate_with_mllm(args) -> int:
    """The ``--mllm`` branch of ``unitok generate``."""
    if not args.prompt:
        raise ValueError('generate --mllm needs --prompt "..." (repeatable)')
    if args.classes:
        raise ValueError('generate --mllm takes --prompt, not --class')
    if args.n < 1:
        raise ValueError(f'--n must be >= 1, got {args.n}')
    check_sample_outputs(args.out)
    model = load_mllm(args)
    lc, (h, w) = model.llm.config, model.config.grid
    check_sample_memory(args.n * len(args.prompt), model.image_tokenizer.config.image_size,
                        kv_bytes(lc.num_hidden_layers, lc.hidden_size, 64 + h * w, args.cfg), args.device)
    codes = model.generate_image(args.prompt, n=args.n, cfg_scale=args.cfg, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, generator=args.seed)
    with torch.no_grad():
        images = model.decode_codes(codes)
    prompts = np.array([p for p in args.prompt for _ in range(args.n)])
    write_samples(args, images, codes, args.n, model.image_tokenizer, prompts=prompts)
    return 0


def kv_bytes(layers: int, width: int, positions: int, cfg: float) -> int:
    """The float32 keys and values one sample caches while it is sampled (twice with guidance)."""
    return 2 * layers * width * positions * 4 * (2 if cfg != 1 else 1)


def check_sample_memory(n: int, image_size: int, per_sample_cache: int, device: str) -> None:
    """Refuse (before any sampling) a request whose samples could not be held at once: each needs its
    cache while sampled and its decoded image (float32, copied into the grid); the error says how much
    memory it would need and how many samples fit in what is free."""
    per_sample = per_sample_cache + 3 * image_size * image_size * 4 * 3
    if torch.device(device).type == 'cuda':
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        import psutil
        free = psutil.virtual_memory().available
    if n * per_sample > 0.8 * free:
        gib = 1 << 30
        raise ValueError(f'--n: {n} samples would need about {n * per_sample / gib:,.1f} GiB of memory '
                         f'({per_sample / (1 << 20):.1f} MiB each), {free / gib:.1f} GiB are free on {device}: '
                         f'ask for at most {max(0, int(0.8 * free // per_sample))} samples in one command')


# The grid formats ``--out`` may name, by suffix; the codes go beside it with ``.npz``.
GRID_FORMATS = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG', '.webp': 'WEBP'}


def check_sample_outputs(out: str) -> str:
    """The codes path beside the grid image ``out``, after checking both before any work: ``out`` must
    name an image format (by suffix) and neither path may be a directory or unwritable."""
    stem, suffix = os.path.splitext(out)
    if suffix.lower() not in GRID_FORMATS:
        raise ValueError(f'--out {out!r} must name the grid image ({", ".join(GRID_FORMATS)}); '
                         f'the codes are written beside it as {stem}.npz')
    check_writable_file(out, what='output image')
    check_writable_file(stem + '.npz', what='codes')
    return stem + '.npz'


def write_samples(args, images: torch.Tensor, codes: torch.Tensor, per_row: int, tokenizer, **extra) -> None:
    """``args.out``: a grid image of ``images`` (``per_row`` a row) in the format its suffix names;
    beside it, the same name with ``.npz``: the codes (uint16), the identity of ``tokenizer`` (which
    decoded them: ``unitok decode`` refuses them for another), the guidance scale, the seed and ``extra``
    arrays (labels or prompts). The codes are written first, so the image appears only with its codes."""
    codes_path = check_sample_outputs(args.out)
    grid = make_grid([images[i:i + per_row] for i in range(0, len(images), per_row)])
    image_format = GRID_FORMATS[os.path.splitext(args.out)[1].lower()]
    identity = {**tokenizer_identity(tokenizer), 'grid': list(codes.shape[2:]), 'image_size': images.shape[-1]}
    meta = dict(codes=codes.cpu().numpy().astype(np.uint16), tokenizer=np.array(json.dumps(identity)),
                cfg=np.float64(args.cfg), seed=np.int64(args.seed), **extra)
    atomic_write(codes_path, lambda f: np.savez(f, **meta), what='codes')
    atomic_write(args.out, lambda f: grid.save(f, format=image_format), what='output image')
    print(f'wrote {args.out} ({len(images)} samples) and {codes_path}')


def register_generate(sub) -> None:
    g = add_command(sub, 'generate', 'sample images from a trained generator', GEN_DOC)
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument('--gen', help='generator model directory (RUN/model of unitok train-gen)')
    which.add_argument('--mllm', help='multimodal LLM directory (RUN/model of unitok train-mllm) or the released '
                       'UniTok MLLM (folder or FoundationVision/unitok_mllm); takes --prompt')
    add_llm_arguments(g)
    g.add_argument('--tokenizer', help='UniTok model that decodes the codes (default: the one it was trained with)')
    g.add_argument('--class', dest='classes', action='append', help='class name (repeatable; default: every class)')
    g.add_argument('--prompt', action='append', help='text prompt (text-conditional generators; repeatable)')
    g.add_argument('--n', type=int, default=8, help='samples per class or prompt')
    g.add_argument('--cfg', type=float, default=1.0, help='classifier-free guidance scale (1: guidance-free)')
    add_sampling_args(g)
    g.add_argument('--device', default='cpu')
    g.add_argument('--out', required=True, help='grid image (.png, .jpg, .webp); the codes go to the same name with .npz')
    g.set_defaults(fn=run_generate)
