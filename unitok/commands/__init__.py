"""The ``unitok`` command line: a thin layer over the library (every command calls functions tests also call).

One module per command family; each module's ``register*`` functions add its sub-commands, listed in
:data:`COMMANDS` in the order ``unitok --help`` shows them. The library never imports this package.

    unitok convert / encode / decode / reconstruct / info      (tokenize.py)
    unitok train                                               (train.py)
    unitok eval / eval-gen / eval-mllm                         (evaluate.py)
    unitok export-codes / train-gen / generate                 (generate.py)
    unitok train-mllm / chat                                   (mllm.py)
    unitok demo / demo-mllm                                    (demo.py, demo_mllm.py)
    unitok studio                                              (studio.py; the app: unitok.apps.studio)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError
from ..images import ImageReadError
from ..train.run import RunDirectoryError
from ..utils.io import OutputError, describe_os_error
from . import demo, demo_mllm, evaluate, generate, mllm, studio, tokenize, train

COMMANDS = (
    tokenize.register,                # convert, encode, decode, reconstruct, info
    train.register,                   # train
    evaluate.register_eval,           # eval
    demo.register,                    # demo
    generate.register_export,         # export-codes
    generate.register_train,          # train-gen
    generate.register_generate,       # generate
    evaluate.register_eval_gen,       # eval-gen
    mllm.register_train,              # train-mllm
    mllm.register_chat,               # chat
    evaluate.register_eval_mllm,      # eval-mllm
    demo_mllm.register,               # demo-mllm
    studio.register,                  # studio
)

# Errors in the input (exit 2) and in the environment (exit 1), reported in one line each.
INPUT_ERRORS = (CheckpointError, ConfigError, ImageReadError, FileNotFoundError, ValueError, TypeError, DataError,
                RunDirectoryError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='unitok', description='UniTok unified image tokenizer')
    sub = p.add_subparsers(dest='command', required=True)
    for register in COMMANDS:
        register(sub)
    return p


def _setup_logging() -> None:
    """The library logs through ``logging``; the command shows INFO and above as ``[unitok] ...`` lines."""
    root = logging.getLogger('unitok')
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter('[unitok] %(message)s'))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run one ``unitok`` command; its exit code (2: bad input, 1: failed read or write, 130: interrupted).
    With ``UNITOK_DEBUG`` set, errors propagate with their traceback."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.fn(args)
    except (OutputError, *INPUT_ERRORS, OSError) as e:
        if os.environ.get('UNITOK_DEBUG'):
            raise
        code, message = _error_report(e)
        print(f'unitok {args.command}: error:{message}', file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f'unitok {args.command}: interrupted', file=sys.stderr)
        return 130


def _error_report(e: Exception) -> tuple[int, str]:
    """The exit code and the message after ``error:``."""
    if isinstance(e, OutputError):         # the environment, not the input: disk full, read-only, ...
        return 1, f' {e}'
    if isinstance(e, INPUT_ERRORS):
        return 2, f' {e}'
    where = f' {e.filename!r}' if e.filename else ''       # any other failed read or write: what and where
    return 1, f'{where} {describe_os_error(e)}'
