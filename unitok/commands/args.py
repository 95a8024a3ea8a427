"""Argument types and parser pieces that several commands share."""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from ..data.files import default_workers
from ..precision import INFERENCE_PRECISIONS

PRECISION_HELP = ('fp32 (default); bf16: the fast path (bf16 weights, fp32 quantizer and projections); '
                  'bf16-convs32: the fast path with the encoder\'s conv stages fp32 (codes closest to fp32)')


# ---------------------------------------------------------------------- argument types
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


def default_device() -> str:
    """``cuda`` when a GPU is available, else ``cpu``."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


# ---------------------------------------------------------------------- parser pieces
def add_command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command parser; ``description`` (a module-style docstring) is shown as written."""
    if description is None:
        return sub.add_parser(name, help=help)
    return sub.add_parser(name, help=help, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument('--precision', choices=tuple(INFERENCE_PRECISIONS), default='fp32', help=PRECISION_HELP)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--batch-size`` and ``--precision`` of the tokenize commands."""
    p.add_argument('--model', required=True, help='model directory, hub id or official .pth')
    p.add_argument('--device', type=device_arg, default=default_device())
    p.add_argument('--batch-size', type=positive_int, default=8)
    add_precision_arg(p)


def add_workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument('--workers', type=non_negative_int, default=default_workers(),
                   help='processes reading and decoding images while the model runs (default: one per '
                        'core beside this process, at most 4; now %(default)s)')


def add_run_arguments(p: argparse.ArgumentParser, config_help: str = 'a TrainConfig mirror') -> None:
    """The arguments every training command has (``unitok train``, ``train-gen``, ``train-mllm``)."""
    p.add_argument('--config', help=f'YAML/JSON training config ({config_help})')
    p.add_argument('--out', help='run directory (checkpoints, logs, images, final model in OUT/model)')
    p.add_argument('--steps', type=int)
    p.add_argument('--batch-size', type=int, help='samples per process and micro-step')
    p.add_argument('--resume', help="'latest' or a checkpoint path: continue that run with its saved config")
    p.add_argument('overrides', nargs='*', help='dotted key=value config overrides, e.g. optim.lr=1e-3')


def add_codes_arguments(p: argparse.ArgumentParser, codes: str, val_codes: str, tokenizer: str) -> None:
    """``--codes``, ``--val-codes`` and ``--tokenizer`` (with these help texts) of the commands that train
    on exported codes."""
    p.add_argument('--codes', help=codes)
    p.add_argument('--val-codes', help=val_codes)
    p.add_argument('--tokenizer', help=tokenizer)


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 1.0, temperature_help: str | None = None):
    """``--temperature``, ``--top-k``, ``--top-p`` and ``--seed`` of the sampling commands."""
    p.add_argument('--temperature', type=float, default=temperature, help=temperature_help)
    p.add_argument('--top-k', type=int, default=0)
    p.add_argument('--top-p', type=float, default=1.0)
    p.add_argument('--seed', type=int, default=0)


def progress(iterable, total=None, desc=None, unit='it'):
    """A progress bar on stderr when it is a terminal."""
    return tqdm(iterable, total=total, desc=desc, disable=not sys.stderr.isatty(), dynamic_ncols=True, unit=unit)
