"""The tokenizer from the shell: ``unitok convert``, ``encode``, ``decode``, ``reconstruct``, ``info``.

    unitok convert OFFICIAL.pth OUT_DIR          released checkpoint -> config.json + model.safetensors
    unitok encode IMAGES... --model DIR --out codes.npz
    unitok decode codes.npz --model DIR --out-dir DIR
    unitok reconstruct IMAGES... --model DIR --out-dir DIR
    unitok info MODEL
"""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import torch

from .. import checkpoint
from ..codes.format import check_code_range
from ..codes.npz import check_codes_match, read_codes_file, write_codes_file
from ..data.files import collect_images, image_file_batches
from ..images import side_by_side, to_pil
from ..model import UniTok
from ..precision import INFERENCE_PRECISIONS, check_precision
from ..utils.io import OutputError, check_writable_dir, check_writable_file, output_error, staged_directory
from ..utils.throughput import ThroughputMeter
from .args import add_command, add_model_args, add_workers_arg, image_side, positive_int, progress

# ---------------------------------------------------------------------- helpers
def _load_model(path: str, device: str, precision: str = 'fp32'):
    """A model for inference in a precision of :data:`unitok.precision.INFERENCE_PRECISIONS` (``bf16``: the
    fast path, bf16 weights and an fp32 quantizer; ``bf16-convs32``: the same with fp32 encoder convs)."""
    return UniTok.from_pretrained(path, **INFERENCE_PRECISIONS[check_precision(precision)]).to(device).eval()


def _image_batches(files: list[str], size: int, args):
    """Batches of ``files`` read in ``args.workers`` loader processes (see unitok.data.files)."""
    return image_file_batches(files, size, args.batch_size, workers=args.workers, skip_bad=args.skip_bad,
                              pin_memory=torch.device(args.device).type == 'cuda')


def _save_png(image, staged_path: str, final_path: str) -> None:
    """Write a PNG into a staging directory; a failure names the path the user asked for."""
    try:
        image.save(staged_path, format='PNG')
    except OSError as e:
        raise output_error('image', final_path, e) from None


def _unique_names(files: list[str]) -> list[str]:
    """Output stems: the file's stem, with ``_1``, ``_2``... when taken (also by another file's own stem)."""
    stems = [os.path.splitext(os.path.basename(f))[0] or 'image' for f in files]
    taken, names = set(stems), []
    used: set[str] = set()
    for stem in stems:
        name, n = stem, 0
        while name in used or (n and name in taken):
            n += 1
            name = f'{stem}_{n}'
        used.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------------- commands
def run_convert(args) -> int:
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(errno.EEXIST, f'cannot write the model directory {out!r}: it is an existing file')
    held = [n for n in ('config.json', 'model.safetensors') if os.path.exists(os.path.join(out, n))]
    if held and not args.force:
        raise OutputError(errno.EEXIST, f'{out!r} already holds a model ({", ".join(held)}); '
                          'pass --force to overwrite it')
    check_writable_dir(out, what='model directory')
    model = checkpoint.load_official_checkpoint(args.checkpoint)     # through the module: tests replace it
    model.save_pretrained(args.out_dir)
    counts = model.parameter_counts()
    print(f'converted {args.checkpoint} -> {args.out_dir} ({counts["total"] / 1e6:.1f} M parameters, '
          f'{model.config.num_codebooks} x {model.config.codebook_size} codes)')
    return 0


def run_encode(args) -> int:
    files = collect_images(args.images)
    check_writable_file(args.out, what='codes file')          # before any work
    model = _load_model(args.model, args.device, args.precision)
    size = args.size or model.config.image_size
    all_codes, kept, skipped = [], [], []
    bar, meter = progress(None, total=len(files), desc='encode', unit='img'), ThroughputMeter()
    for x, ok, bad in meter.wait(_image_batches(files, size, args)):
        skipped += bad
        if x is not None:
            with meter.model(len(ok)):
                all_codes.append(model.encode(x.to(args.device, non_blocking=True)).cpu())
            kept += ok
        bar.update(len(ok) + len(bad))
    bar.close()
    speed = meter.result()
    if not kept:
        raise ValueError('no image could be read')
    codes = torch.cat(all_codes)
    dtype = write_codes_file(args.out, model, codes, kept, size, [f for f, _ in skipped], args.precision)
    print(f'encoded {len(kept)} image(s) -> {args.out}: codes {tuple(codes.shape)} {np.dtype(dtype).name}'
          + (f'; skipped {len(skipped)} unreadable: ' + ', '.join(f for f, _ in skipped) if skipped else ''))
    print(f'{speed.summary()} ({args.workers} loader worker(s))')
    return 0


def run_decode(args) -> int:
    check_writable_dir(args.out_dir)                              # before any work
    data = read_codes_file(args.codes)
    model = _load_model(args.model, args.device, args.precision)
    if args.ignore_mismatch:
        check_code_range(data.codes, model.quantizer, repr(args.codes), data.files)
    else:
        check_codes_match(args.codes, data, model)
    codes, grid = data.codes, (tuple(args.grid) if args.grid else None)
    model.decode(codes[:1].to(args.device), grid=grid)            # shape / grid errors before any output
    names = _unique_names(data.files)
    with staged_directory(args.out_dir) as staging:
        for i in progress(range(0, codes.shape[0], args.batch_size), desc='decode'):
            images = model.decode(codes[i:i + args.batch_size].to(args.device), grid=grid)
            for name, im in zip(names[i:i + args.batch_size], to_pil(images)):
                _save_png(im, os.path.join(staging, name + '.png'), os.path.join(args.out_dir, name + '.png'))
    print(f'decoded {codes.shape[0]} image(s) -> {args.out_dir}')
    return 0


def run_reconstruct(args) -> int:
    files = collect_images(args.images)
    check_writable_dir(args.out_dir)                              # before any work
    model = _load_model(args.model, args.device, args.precision)
    size = args.size or model.config.image_size
    psnrs, skipped, name_of = [], [], dict(zip(files, _unique_names(files)))
    with staged_directory(args.out_dir) as staging:      # an error leaves no PNG of earlier batches behind
        for x, ok, bad in progress(_image_batches(files, size, args), desc='reconstruct',
                                   total=-(-len(files) // args.batch_size)):
            skipped += bad
            if x is None:
                continue
            rec = model.reconstruct(x.to(args.device)).cpu()
            mse = ((rec - x) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
            psnrs += (-10 * torch.log10(mse)).tolist()
            for f, im in zip(ok, side_by_side(x, rec)):
                _save_png(im, os.path.join(staging, name_of[f] + '.png'), os.path.join(args.out_dir, name_of[f] + '.png'))
        if not psnrs:
            raise ValueError('no image could be read')
    print(f'reconstructed {len(psnrs)} image(s) -> {args.out_dir} (left: input, right: reconstruction); '
          f'PSNR mean {np.mean(psnrs):.2f} dB' + (f'; skipped {len(skipped)}' if skipped else ''))
    return 0


def run_info(args) -> int:
    model = UniTok.from_pretrained(args.model)
    cfg = model.config
    print(json.dumps(cfg.to_dict(), indent=2))
    print(f'latent {cfg.latent_dim} = {cfg.num_codebooks} x {cfg.code_dim}; vocabulary {cfg.num_codebooks} x '
          f'{cfg.codebook_size} = {cfg.vocab_size}; {cfg.grid_size}x{cfg.grid_size} tokens at {cfg.image_size} px')
    for part, n in model.parameter_counts().items():
        print(f'{part:16s} {n / 1e6:10.2f} M')
    return 0


# ---------------------------------------------------------------------- parsers
def register(sub) -> None:
    """``convert``, ``encode``, ``decode``, ``reconstruct`` and ``info``."""
    s = add_command(sub, 'convert', 'official release checkpoint -> safetensors model directory')
    s.add_argument('checkpoint')
    s.add_argument('out_dir')
    s.add_argument('--force', action='store_true', help='overwrite a model already in OUT_DIR')
    s.set_defaults(fn=run_convert)

    s = add_command(sub, 'encode', 'images -> codes (.npz)')
    s.add_argument('images', nargs='+', help='image files or directories')
    s.add_argument('--out', required=True, help='output .npz')
    s.add_argument('--size', type=image_side, default=None, help='resize + centre crop side (default: model size)')
    s.add_argument('--skip-bad', action='store_true', help='skip unreadable images instead of stopping')
    add_workers_arg(s)
    add_model_args(s)
    s.set_defaults(fn=run_encode)

    s = add_command(sub, 'decode', 'codes (.npz) -> PNG images')
    s.add_argument('codes')
    s.add_argument('--out-dir', required=True)
    s.add_argument('--grid', type=positive_int, nargs=2, metavar=('H', 'W'), help='token grid for flat codes')
    s.add_argument('--ignore-mismatch', action='store_true',
                   help='decode codes written by a model with another configuration or other codebooks')
    add_model_args(s)
    s.set_defaults(fn=run_decode)

    s = add_command(sub, 'reconstruct', 'images -> side-by-side input | reconstruction PNGs')
    s.add_argument('images', nargs='+')
    s.add_argument('--out-dir', required=True)
    s.add_argument('--size', type=image_side, default=None)
    s.add_argument('--skip-bad', action='store_true')
    add_workers_arg(s)
    add_model_args(s)
    s.set_defaults(fn=run_reconstruct)

    s = add_command(sub, 'info', 'config and parameter counts of a model')
    s.add_argument('model')
    s.set_defaults(fn=run_info)
