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
import errno
import hashlib
import json
import os
import sys
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .precision import INFERENCE_PRECISIONS, check_precision


# ---------------------------------------------------------------------- helpers
def _progress(iterable, total=None, desc=None, disable=False, unit='it'):
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=disable or not sys.stderr.isatty(), dynamic_ncols=True,
                unit=unit)


def _image_batches(files: list[str], size: int, args):
    """Batches of ``files`` read in ``args.workers`` loader processes (see unitok.data.files)."""
    from .data.files import image_file_batches
    return image_file_batches(files, size, args.batch_size, workers=args.workers, skip_bad=args.skip_bad,
                              pin_memory=torch.device(args.device).type == 'cuda')


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


def _load_model(path: str, device: str, precision: str = 'fp32'):
    """A model for inference in a precision of :data:`unitok.precision.INFERENCE_PRECISIONS` (``bf16``: the
    fast path, bf16 weights and an fp32 quantizer; ``bf16-convs32``: the same with fp32 encoder convs)."""
    from .model import UniTok
    return UniTok.from_pretrained(path, **INFERENCE_PRECISIONS[check_precision(precision)]).to(device).eval()


def _int_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer >= {minimum}, got {text!r}') from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f'must be >= {minimum}, got {value}')
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(0, text)


def image_side(text: str) -> int:
    """argparse type: an image side in pixels, a positive multiple of 16 (the encoder's patch size)."""
    value = positive_int(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f'must be a multiple of 16 (the encoder downsamples 16x), got {value}')
    return value


def device_arg(text: str) -> str:
    """argparse type: a torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f'{text!r} is not a torch device ({e})') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f'{text!r}: no CUDA GPU is available on this machine '
                                             '(torch.cuda.is_available() is False); use --device cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f'{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f'{text!r}: MPS is not available on this machine; use --device cpu')
    elif device.type not in ('cpu', 'cuda', 'mps'):
        raise argparse.ArgumentTypeError(f'unsupported device {text!r}; use cpu, cuda[:N] or mps')
    return text


def _save_png(image, staged_path: str, final_path: str) -> None:
    """Write a PNG into a staging directory; a failure names the path the user asked for."""
    from .utils.io import output_error
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
def cmd_convert(args) -> int:
    from .checkpoint import load_official_checkpoint
    from .utils.io import OutputError, check_writable_dir
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(errno.EEXIST, f'cannot write the model directory {out!r}: it is an existing file')
    held = [n for n in ('config.json', 'model.safetensors') if os.path.exists(os.path.join(out, n))]
    if held and not args.force:
        raise OutputError(errno.EEXIST, f'{out!r} already holds a model ({", ".join(held)}); '
                          'pass --force to overwrite it')
    check_writable_dir(out, what='model directory')
    model = load_official_checkpoint(args.checkpoint)
    model.save_pretrained(args.out_dir)
    counts = model.parameter_counts()
    print(f'converted {args.checkpoint} -> {args.out_dir} ({counts["total"] / 1e6:.1f} M parameters, '
          f'{model.config.num_codebooks} x {model.config.codebook_size} codes)')
    return 0


def cmd_encode(args) -> int:
    from .utils.io import atomic_write, check_writable_file
    from .utils.throughput import ThroughputMeter
    files = collect_images(args.images)
    check_writable_file(args.out, what='codes file')          # before any work
    model = _load_model(args.model, args.device, args.precision)
    size = args.size or model.config.image_size
    all_codes, kept, skipped = [], [], []
    bar, meter = _progress(None, total=len(files), desc='encode', unit='img'), ThroughputMeter()
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
    dtype = np.int16 if model.config.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    payload = dict(codes=codes.numpy().astype(dtype), files=np.array(kept), image_size=np.array(size),
                   config=np.array(model.config.to_json()), codebook_digest=np.array(codebook_digest(model)),
                   skipped=np.array([f for f, _ in skipped], dtype=str), precision=np.array(args.precision))

    def write(f):
        np.savez_compressed(f, **payload)
    atomic_write(args.out, write, what='codes file')
    print(f'encoded {len(kept)} image(s) -> {args.out}: codes {tuple(codes.shape)} {np.dtype(dtype).name}'
          + (f'; skipped {len(skipped)} unreadable: ' + ', '.join(f for f, _ in skipped) if skipped else ''))
    print(f'{speed.summary()} ({args.workers} loader worker(s))')
    return 0


# Fields of UniTokConfig that decide what a code id means; the decoder may differ (codebook digest decides).
CODE_FIELDS = ('num_codebooks', 'codebook_size', 'code_dim', 'num_query')


@dataclass
class CodesFile:
    """What :func:`read_codes_file` returns."""
    codes: torch.Tensor          # (N, K, h, w) or (N, K, L) int64
    files: list[str]             # source name of each entry
    config: dict | None          # UniTokConfig dict of the model that wrote the file (None: not stored)
    codebook_digest: str | None  # :func:`codebook_digest` of that model (None: not stored)


def codebook_digest(model) -> str:
    """Short fingerprint of a model's code vectors: equal digests mean code ids mean the same vectors."""
    table = model.quantizer.codebook.detach().float().cpu().contiguous().numpy()
    return hashlib.sha256(table.tobytes()).hexdigest()[:16]


def read_codes_file(path: str) -> CodesFile:
    """Codes, source names and the writer's config from an ``unitok encode`` file (or any .npz/.npy
    holding a ``codes`` array). Every unreadable, corrupt or malformed file raises one ``ValueError``
    naming it; pickled arrays are refused, never loaded."""
    if os.path.isdir(path):
        raise ValueError(f'{path!r} is a directory, not a codes file (.npz from unitok encode, or .npy)')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no codes file at {path!r}')
    with open(path, 'rb') as f:
        head = f.read(8)
    is_npy, is_zip = head.startswith(b'\x93NUMPY'), head[:4] in (b'PK\x03\x04', b'PK\x05\x06')
    if not (is_npy or is_zip):
        raise ValueError(f'{path!r} is not a codes file: neither a .npz (zip) archive nor a .npy array '
                         f'(it starts with {head!r})')
    config = digest = None
    try:
        if is_npy:
            codes, files = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as z:
                if 'codes' not in z.files:
                    raise ValueError(f'no "codes" array (arrays: {z.files})')
                codes = z['codes']
                files = [str(f) for f in np.atleast_1d(z['files'])] if 'files' in z.files else None
                config = str(z['config']) if 'config' in z.files else None
                digest = str(z['codebook_digest']) if 'codebook_digest' in z.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        why = 'it holds pickled (object) arrays, which are never loaded' if 'pickle' in str(e) else \
            f'the file is truncated or corrupt ({type(e).__name__}: {e})' if not isinstance(e, ValueError) or \
            isinstance(e, zipfile.BadZipFile) else str(e)
        raise ValueError(f'cannot read codes from {path!r}: {why}') from None
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f'codes in {path!r} must be integers, got {codes.dtype}')
    if codes.ndim not in (3, 4) or codes.shape[0] == 0:
        raise ValueError(f'codes in {path!r} must be an array (N, K, h, w) or (N, K, L) with N >= 1, '
                         f'got shape {codes.shape}')
    files = files or [f'{i:06d}' for i in range(codes.shape[0])]
    if len(files) != codes.shape[0]:
        raise ValueError(f'{path!r} names {len(files)} file(s) for {codes.shape[0]} code entries')
    if config is not None:
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path!r}: the stored model config is not valid JSON ({e})') from None
        if not isinstance(config, dict):
            raise ValueError(f'{path!r}: the stored model config is not a JSON object')
    return CodesFile(torch.from_numpy(codes.astype(np.int64)), files, config, digest)


def check_codes_match(path: str, data: CodesFile, model) -> None:
    """Refuse codes written by a model whose code space differs from ``model``'s (another
    configuration, or the same configuration with other codebooks)."""
    cfg = model.config.to_dict()
    if data.config is not None:
        diffs = [f'{k} {data.config[k]!r} in the file, {cfg[k]!r} in the model'
                 for k in CODE_FIELDS if k in data.config and data.config[k] != cfg[k]]
        if diffs:
            raise ValueError(f'{path!r} was encoded by a model with another configuration ({"; ".join(diffs)}); '
                             'decode it with that model, or pass --ignore-mismatch')
    if data.codebook_digest is not None and data.codebook_digest != codebook_digest(model):
        raise ValueError(f'{path!r} was encoded by a model with other codebooks (digest {data.codebook_digest}, '
                         f'this model {codebook_digest(model)}): the code ids would mean other vectors; decode '
                         'it with that model, or pass --ignore-mismatch')
    n = model.config.codebook_size
    bad = ((data.codes < 0) | (data.codes >= n)).flatten(1).any(1).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f'codes must lie in [0, {n}) for this model; entry {i} ({data.files[i]}) of {path!r} '
                         f'has values in [{int(data.codes[i].min())}, {int(data.codes[i].max())}] '
                         f'({len(bad)} bad entr{"y" if len(bad) == 1 else "ies"})')


def cmd_decode(args) -> int:
    from .images import to_pil
    from .utils.io import check_writable_dir, staged_directory
    check_writable_dir(args.out_dir)                              # before any work
    data = read_codes_file(args.codes)
    model = _load_model(args.model, args.device, args.precision)
    if args.ignore_mismatch:
        n = model.config.codebook_size
        if int(data.codes.min()) < 0 or int(data.codes.max()) >= n:
            raise ValueError(f'codes in {args.codes!r} must lie in [0, {n}) for this model')
    else:
        check_codes_match(args.codes, data, model)
    codes, grid = data.codes, (tuple(args.grid) if args.grid else None)
    model.decode(codes[:1].to(args.device), grid=grid)            # shape / grid errors before any output
    names = _unique_names(data.files)
    with staged_directory(args.out_dir) as staging:
        for i in _progress(range(0, codes.shape[0], args.batch_size), desc='decode'):
            images = model.decode(codes[i:i + args.batch_size].to(args.device), grid=grid)
            for name, im in zip(names[i:i + args.batch_size], to_pil(images)):
                _save_png(im, os.path.join(staging, name + '.png'), os.path.join(args.out_dir, name + '.png'))
    print(f'decoded {codes.shape[0]} image(s) -> {args.out_dir}')
    return 0


def cmd_reconstruct(args) -> int:
    from .images import side_by_side
    from .utils.io import check_writable_dir, staged_directory
    files = collect_images(args.images)
    check_writable_dir(args.out_dir)                              # before any work
    model = _load_model(args.model, args.device, args.precision)
    size = args.size or model.config.image_size
    psnrs, skipped, name_of = [], [], dict(zip(files, _unique_names(files)))
    with staged_directory(args.out_dir) as staging:      # an error leaves no PNG of earlier batches behind
        for x, ok, bad in _progress(_image_batches(files, size, args), desc='reconstruct',
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
PRECISION_HELP = ('fp32 (default); bf16: the fast path (bf16 weights, fp32 quantizer and projections); '
                  'bf16-convs32: the fast path with the encoder\'s conv stages fp32 (codes closest to fp32)')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='unitok', description='UniTok unified image tokenizer')
    sub = p.add_subparsers(dest='command', required=True)

    def model_args(s, need_model=True):
        if need_model:
            s.add_argument('--model', required=True, help='model directory, hub id or official .pth')
        s.add_argument('--device', type=device_arg, default='cuda' if torch.cuda.is_available() else 'cpu')
        s.add_argument('--batch-size', type=positive_int, default=8)
        s.add_argument('--precision', choices=tuple(INFERENCE_PRECISIONS), default='fp32', help=PRECISION_HELP)

    def workers_arg(s):
        from .data.files import default_workers
        s.add_argument('--workers', type=non_negative_int, default=default_workers(),
                       help='processes reading and decoding images while the model runs (default: one per '
                            'core beside this process, at most 4; now %(default)s)')

    s = sub.add_parser('convert', help='official release checkpoint -> safetensors model directory')
    s.add_argument('checkpoint')
    s.add_argument('out_dir')
    s.add_argument('--force', action='store_true', help='overwrite a model already in OUT_DIR')
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser('encode', help='images -> codes (.npz)')
    s.add_argument('images', nargs='+', help='image files or directories')
    s.add_argument('--out', required=True, help='output .npz')
    s.add_argument('--size', type=image_side, default=None, help='resize + centre crop side (default: model size)')
    s.add_argument('--skip-bad', action='store_true', help='skip unreadable images instead of stopping')
    workers_arg(s)
    model_args(s)
    s.set_defaults(fn=cmd_encode)

    s = sub.add_parser('decode', help='codes (.npz) -> PNG images')
    s.add_argument('codes')
    s.add_argument('--out-dir', required=True)
    s.add_argument('--grid', type=positive_int, nargs=2, metavar=('H', 'W'), help='token grid for flat codes')
    s.add_argument('--ignore-mismatch', action='store_true',
                   help='decode codes written by a model with another configuration or other codebooks')
    model_args(s)
    s.set_defaults(fn=cmd_decode)

    s = sub.add_parser('reconstruct', help='images -> side-by-side input | reconstruction PNGs')
    s.add_argument('images', nargs='+')
    s.add_argument('--out-dir', required=True)
    s.add_argument('--size', type=image_side, default=None)
    s.add_argument('--skip-bad', action='store_true')
    workers_arg(s)
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
    for module in ('unitok.train.cli', 'unitok.eval.cli', 'unitok.demo', 'unitok.generation.export_cli',
                   'unitok.generation.cli', 'unitok.eval.generation_cli', 'unitok.mllm.cli', 'unitok.eval.mllm_cli',
                   'unitok.mllm.demo'):
        try:
            mod = __import__(module, fromlist=['register'])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith('unitok'):
                continue
            raise
        commands.append(mod.register)
    return commands


def _setup_logging() -> None:
    """The library logs through ``logging``; the command shows INFO and above as ``[unitok] ...`` lines."""
    import logging
    root = logging.getLogger('unitok')
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter('[unitok] %(message)s'))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .images import ImageReadError
    from .data import DataError
    from .train.run import RunDirectoryError
    args = build_parser().parse_args(argv)
    _setup_logging()
    from .utils.io import OutputError, describe_os_error
    try:
        return args.fn(args)
    except OutputError as e:               # the environment, not the input: disk full, read-only, ...
        if os.environ.get('UNITOK_DEBUG'):
            raise
        print(f'unitok {args.command}: error: {e}', file=sys.stderr)
        return 1
    except (CheckpointError, ConfigError, ImageReadError, FileNotFoundError, ValueError, TypeError, DataError,
            RunDirectoryError) as e:
        if os.environ.get('UNITOK_DEBUG'):
            raise
        print(f'unitok {args.command}: error: {e}', file=sys.stderr)
        return 2
    except OSError as e:                   # any other failed read or write: one line, what and where
        if os.environ.get('UNITOK_DEBUG'):
            raise
        where = f' {e.filename!r}' if e.filename else ''
        print(f'unitok {args.command}: error:{where} {describe_os_error(e)}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'unitok {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
