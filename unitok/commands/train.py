"""``unitok train``, and the configuration and exit code of every training command."""
from __future__ import annotations

import argparse
import logging
import os

from ..train.config import TrainConfig
from ..train.loop import Trainer
from ..train.run import config_changes, saved_config
from ..utils import distributed as D
from .args import add_command, add_run_arguments

log = logging.getLogger('unitok.train')

TRAIN_DOC = """``unitok train``: single process, or one process per device under ``torchrun``.

    unitok train --preset unitok-tiny --data builtin:emoji --out runs/tiny --steps 300
    unitok train --out runs/tiny --resume latest                  # continues with the run's own config
    unitok train --out runs/tiny --resume latest --steps 600      # ... changing what is given (reported)
    torchrun --nproc_per_node 8 -m unitok.train.cli --preset unitok-large --data 'shards/{00000..09999}.tar' ...

A fresh run refuses a directory that holds another run; --resume takes the saved configuration.
"""


def assignments(args, direct: dict) -> list[str]:
    """The settings given on the command line (``direct``: dotted key -> value or None), then the
    positional overrides, as dotted assignments."""
    return [f'{k}={v}' for k, v in direct.items() if v is not None] + list(args.overrides)


def explicit_assignments(args) -> list[str]:
    """The settings of ``unitok train`` given on the command line, as dotted assignments."""
    return assignments(args, {'preset': args.preset, 'data.train': args.data, 'data.val': args.val_data,
                              'out': args.out, 'steps': args.steps, 'data.batch_size': args.batch_size,
                              'init': args.init})


def resolve_config(args, cfg_class=TrainConfig, assignments: list[str] | None = None):
    """Fresh run: defaults (or --config) + the command line. Resume: the run's saved config + the
    command line, with every change logged. ``assignments``: the command line's settings (default:
    those of ``unitok train``)."""
    given = explicit_assignments(args) if assignments is None else assignments
    if not args.resume:
        cfg = cfg_class.load(args.config) if args.config else cfg_class()
        return cfg.override(given)
    checkpoint = args.resume if args.resume != 'latest' else None
    out = args.out or (os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))) if checkpoint else None)
    if out is None:
        raise SystemExit('unitok: error: --resume latest needs --out RUN_DIR')
    saved = saved_config(cfg_class, out, checkpoint)
    base = cfg_class.load(args.config) if args.config else saved
    cfg = base.override(given + ([] if args.out else [f'out={out}']))
    changes = config_changes(saved, cfg)
    if changes:
        log.info('resuming with changed settings: ' + ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items()))
    return cfg


def run_training(cfg, resume: str | None) -> int:
    """Join the process group (if under torchrun), train, leave it; the process exit code."""
    info = D.init_distributed()
    try:
        summary = Trainer(cfg, info=info).fit(resume=resume)
    except BaseException:
        D.abort()            # do not wait in a barrier for ranks that will never arrive
        raise
    D.shutdown()
    return exit_code(summary)


def exit_code(summary: dict) -> int:
    """0 when finished; 128 + the signal number when stopped by a signal (143 for SIGTERM)."""
    if summary['exit'] == 'finished':
        return 0
    return 130 if summary['exit'] == 'signal SIGINT' else 143


def run(args) -> int:
    return run_training(resolve_config(args), args.resume)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--preset', help='model preset, e.g. unitok-tiny, unitok-base, unitok-large')
    p.add_argument('--data', help='training data spec: builtin:emoji, shards/{000..099}.tar, folder:DIR')
    p.add_argument('--val-data', help='held-out data spec (default: the val split of --data)')
    p.add_argument('--init', help='start from these weights (model directory or official .pth)')
    add_run_arguments(p)


def register(sub) -> None:
    p = add_command(sub, 'train', 'train a UniTok tokenizer', TRAIN_DOC)
    add_arguments(p)
    p.set_defaults(fn=run)
