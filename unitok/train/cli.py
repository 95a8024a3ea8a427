"""``unitok train``: single process, or one process per device under ``torchrun``.

    unitok train --preset unitok-tiny --data builtin:emoji --out runs/tiny --steps 300
    unitok train --config my.yaml --out runs/x --resume latest optim.lr=1e-3 loss.perceptual=none
    torchrun --nproc_per_node 8 -m unitok.train.cli --preset unitok-large --data 'shards/{00000..09999}.tar' ...
"""
from __future__ import annotations

import argparse
import sys

from .config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--config', help='YAML/JSON training config (a TrainConfig mirror)')
    p.add_argument('--preset', help='model preset, e.g. unitok-tiny, unitok-base, unitok-large')
    p.add_argument('--data', help='training data spec: builtin:emoji, shards/{000..099}.tar, folder:DIR')
    p.add_argument('--val-data', help='held-out data spec (default: the val split of --data)')
    p.add_argument('--out', help='run directory (checkpoints, logs, images, final model)')
    p.add_argument('--steps', type=int)
    p.add_argument('--batch-size', type=int, help='images per process and micro-step')
    p.add_argument('--resume', help="'latest' or a checkpoint path")
    p.add_argument('--init', help='start from these weights (model directory or official .pth)')
    p.add_argument('overrides', nargs='*', help='dotted key=value config overrides, e.g. optim.lr=1e-3')


def config_from_args(args) -> TrainConfig:
    cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    direct = {'preset': args.preset, 'data.train': args.data, 'data.val': args.val_data, 'out': args.out,
              'steps': args.steps, 'data.batch_size': args.batch_size, 'init': args.init}
    assignments = [f'{k}={v}' for k, v in direct.items() if v is not None] + list(args.overrides)
    return cfg.override(assignments)


def run(args) -> int:
    from . import distributed as D
    from .trainer import Trainer
    cfg = config_from_args(args)
    info = D.init_distributed()
    try:
        summary = Trainer(cfg, info).fit(resume=args.resume)
    except BaseException:
        D.abort()            # do not wait in a barrier for ranks that will never arrive
        raise
    D.shutdown()
    return 0 if summary['exit'] == 'finished' else 143


def register(sub) -> None:
    p = sub.add_parser('train', help='train a UniTok tokenizer', description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='unitok-train', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
