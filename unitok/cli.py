"""``unitok`` command line: a thin layer over the library (every command calls functions tests also call).

    unitok convert OFFICIAL.pth OUT_DIR          released checkpoint -> config.json + model.safetensors
    unitok encode IMAGES... --model DIR --out codes.npz
    unitok decode codes.npz --model DIR --out-dir DIR
    unitok reconstruct IMAGES... --model DIR --out-dir DIR
    unitok info MODEL
    unitok train ... / unitok eval ... / unitok demo ...   (see --help of each)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
import torch


# ---------------------------------------------------------------------- helpers
def _progress(iterable, total=None, desc=None, disable=False):
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=disable or not sys.stderr.isatty(), dynamic_ncols=True)


def collect_images(paths: list[str]) -> list[str]:
    """Expand directories (recursively, sorted) into image files; explicit files are kept as given."""
    from .images import IMAGE_EXTENSIONS
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.exists(p):
            files.append(p)
        else:
            raise FileNotFoundError(f'no such file or directory: {p!r}')
    if not files:
        raise ValueError(f'no image files found in {paths}')
    return files


def _load_model(path: str, device: str):
    from .model import UniTok
    return UniTok.from_pretrained(path).to(device).eval()


def _batches(files: list[str], size: int):
    for i in range(0, len(files), size):
        yield files[i:i + size]


def _read_batch(files, image_size, skip_bad):
    """-> (tensor or None, kept files, skipped (file, reason) pairs)."""
    from .images import ImageReadError, load_image, to_tensor
    images, kept, skipped = [], [], []
    for f in files:
        try:
            images.append(load_image(f))
            kept.append(f)
        except ImageReadError as e:
            if not skip_bad:
                raise
            skipped.append((f, str(e)))
    return (to_tensor(images, size=image_size) if images else None), kept, skipped


def _save_png(image, path: str) -> None:
    from .utils.io import atomic_write
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _unique_names(files: list[str]) -> list[str]:
    names, seen = [], {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f'{stem}_{seen[stem] - 1}')
    return names


# ---------------------------------------------------------------------- commands
def cmd_convert(args) -> int:
    from .checkpoint import load_official_checkpoint
    model = load_official_checkpoint(args.checkpoint)
    model.save_pretrained(args.out_dir)
    counts = model.parameter_counts()
    print(f'converted {args.checkpoint} -> {args.out_dir} ({counts["total"] / 1e6:.1f} M parameters, '
          f'{model.config.num_codebooks} x {model.config.codebook_size} codes)')
    return 0


def cmd_encode(args) -> int:
    from .utils.io import atomic_write
    model = _load_model(args.model, args.device)
    files = collect_images(args.images)
    size = args.size or model.config.image_size
    all_codes, kept, skipped = [], [], []
    for chunk in _progress(list(_batches(files, args.batch_size)), desc='encode'):
        x, ok, bad = _read_batch(chunk, size, args.skip_bad)
        skipped += bad
        if x is not None:
            all_codes.append(model.encode(x.to(args.device)).cpu())
            kept += ok
    if not kept:
        raise ValueError('no image could be read')
    codes = torch.cat(all_codes)
    dtype = np.int16 if model.config.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    payload = dict(codes=codes.numpy().astype(dtype), files=np.array(kept), image_size=np.array(size),
                   config=np.array(model.config.to_json()),
                   skipped=np.array([f for f, _ in skipped], dtype=str))

    def write(f):
        np.savez_compressed(f, **payload)
    atomic_write(args.out, write)
    print(f'encoded {len(kept)} image(s) -> {args.out}: codes {tuple(codes.shape)} {np.dtype(dtype).name}'
          + (f'; skipped {len(skipped)} unreadable: ' + ', '.join(f for f, _ in skipped) if skipped else ''))
    return 0


def read_codes_file(path: str) -> tuple[torch.Tensor, list[str]]:
    """Codes and source names from an ``unitok encode`` file (or any .npz/.npy holding a ``codes`` array)."""
    try:
        if path.endswith('.npy'):
            codes, files = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as z:
                if 'codes' not in z.files:
                    raise ValueError(f'{path!r} has no "codes" array (arrays: {z.files})')
                codes = z['codes']
                files = [str(f) for f in z['files']] if 'files' in z.files else None
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read codes from {path!r}: {e}') from None
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f'codes in {path!r} must be integers, got {codes.dtype}')
    files = files or [f'{i:06d}' for i in range(codes.shape[0])]
    return torch.from_numpy(codes.astype(np.int64)), files


def cmd_decode(args) -> int:
    from .images import to_pil
    model = _load_model(args.model, args.device)
    codes, files = read_codes_file(args.codes)
    grid = tuple(args.grid) if args.grid else None
    names = _unique_names(files)
    os.makedirs(args.out_dir, exist_ok=True)
    for i in _progress(range(0, codes.shape[0], args.batch_size), desc='decode'):
        images = model.decode(codes[i:i + args.batch_size].to(args.device), grid=grid)
        for name, im in zip(names[i:i + args.batch_size], to_pil(images)):
            _save_png(im, os.path.join(args.out_dir, name + '.png'))
    print(f'decoded {codes.shape[0]} image(s) -> {args.out_dir}')
    return 0


def cmd_reconstruct(args) -> int:
    from .images import side_by_side
    model = _load_model(args.model, args.device)
    files = collect_images(args.images)
    size = args.size or model.config.image_size
    os.makedirs(args.out_dir, exist_ok=True)
    psnrs, skipped, name_of = [], [], dict(zip(files, _unique_names(files)))
    for chunk in _progress(list(_batches(files, args.batch_size)), desc='reconstruct'):
        x, ok, bad = _read_batch(chunk, size, args.skip_bad)
        skipped += bad
        if x is None:
            continue
        rec = model.reconstruct(x.to(args.device)).cpu()
        mse = ((rec - x) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
        psnrs += (-10 * torch.log10(mse)).tolist()
        for f, im in zip(ok, side_by_side(x, rec)):
            _save_png(im, os.path.join(args.out_dir, name_of[f] + '.png'))
    if not psnrs:
        raise ValueError('no image could be read')
    print(f'reconstructed {len(psnrs)} image(s) -> {args.out_dir} (left: input, right: reconstruction); '
          f'PSNR mean {np.mean(psnrs):.2f} dB' + (f'; skipped {len(skipped)}' if skipped else ''))
    return 0


def cmd_info(args) -> int:
    from .model import UniTok
    model = UniTok.from_pretrained(args.model)
    cfg = model.config
    print(json.dumps(cfg.to_dict(), indent=2))
    print(f'latent {cfg.latent_dim} = {cfg.num_codebooks} x {cfg.code_dim}; vocabulary {cfg.num_codebooks} x '
          f'{cfg.codebook_size} = {cfg.vocab_size}; {cfg.grid_size}x{cfg.grid_size} tokens at {cfg.image_size} px')
    for part, n in model.parameter_counts().items():
        print(f'{part:16s} {n / 1e6:10.2f} M')
    return 0


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='unitok', description='UniTok unified image tokenizer')
    sub = p.add_subparsers(dest='command', required=True)

    def model_args(s, need_model=True):
        if need_model:
            s.add_argument('--model', required=True, help='model directory, hub id or official .pth')
        s.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
        s.add_argument('--batch-size', type=int, default=8)

    s = sub.add_parser('convert', help='official release checkpoint -> safetensors model directory')
    s.add_argument('checkpoint')
    s.add_argument('out_dir')
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser('encode', help='images -> codes (.npz)')
    s.add_argument('images', nargs='+', help='image files or directories')
    s.add_argument('--out', required=True, help='output .npz')
    s.add_argument('--size', type=int, default=None, help='resize + centre crop side (default: model size)')
    s.add_argument('--skip-bad', action='store_true', help='skip unreadable images instead of stopping')
    model_args(s)
    s.set_defaults(fn=cmd_encode)

    s = sub.add_parser('decode', help='codes (.npz) -> PNG images')
    s.add_argument('codes')
    s.add_argument('--out-dir', required=True)
    s.add_argument('--grid', type=int, nargs=2, metavar=('H', 'W'), help='token grid for flat codes')
    model_args(s)
    s.set_defaults(fn=cmd_decode)

    s = sub.add_parser('reconstruct', help='images -> side-by-side input | reconstruction PNGs')
    s.add_argument('images', nargs='+')
    s.add_argument('--out-dir', required=True)
    s.add_argument('--size', type=int, default=None)
    s.add_argument('--skip-bad', action='store_true')
    model_args(s)
    s.set_defaults(fn=cmd_reconstruct)

    s = sub.add_parser('info', help='config and parameter counts of a model')
    s.add_argument('model')
    s.set_defaults(fn=cmd_info)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Sub-commands that live with their subsystems (training, evaluation, demo)."""
    commands = []
    for module in ('unitok.train.cli', 'unitok.eval.cli', 'unitok.demo', 'unitok.generation.export_cli'):
        try:
            mod = __import__(module, fromlist=['register'])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith('unitok'):
                continue
            raise
        commands.append(mod.register)
    return commands


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .images import ImageReadError
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, ConfigError, ImageReadError, FileNotFoundError, ValueError, TypeError) as e:
        if os.environ.get('UNITOK_DEBUG'):
            raise
        print(f'unitok {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'unitok {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
