"""Images per second of a unitok-tiny training step on this CPU, bf16 autocast vs fp32, in one run.

    python benchmarks/train_step.py                      # full official losses with the PatchGAN on
    python benchmarks/train_step.py --no-gan --perceptual none

A step is the real ``Trainer.train_step``: forward, losses, backward and optimizer steps of the
tokenizer (and of the discriminator when the GAN is on), on one fixed batch of built-in images.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from unitok.train import Trainer, TrainConfig  # noqa: E402


def images_per_second(precision, args, out):
    cfg = TrainConfig(out=out, steps=10, precision=precision, log_every=0, eval_every=0, image_every=0,
                      ckpt_every=0).override([
        f'data.batch_size={args.batch}', 'data.num_workers=0', f'loss.perceptual={args.perceptual}',
        f'loss.discriminator={"none" if args.no_gan else "patchgan"}', 'loss.disc_start=0'])
    trainer = Trainer(cfg)
    batch = trainer.task.to_device(next(trainer.data), trainer.strategy.device)
    for _ in range(args.warmup):
        trainer.train_step([batch])
        trainer.step += 1
    t = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step([batch])
        trainer.step += 1
    return args.batch * args.steps / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--perceptual', default='effnet-lite0')
    p.add_argument('--no-gan', action='store_true')
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        fp32 = images_per_second('fp32', args, out)
        bf16 = images_per_second('bf16', args, out)
    print(f'unitok-tiny train step, batch {args.batch}, perceptual {args.perceptual}, '
          f'GAN {"off" if args.no_gan else "on"}, {torch.get_num_threads()} threads')
    print(f'fp32: {fp32:7.1f} images/s')
    print(f'bf16: {bf16:7.1f} images/s  (x{bf16 / fp32:.2f} vs fp32)')


if __name__ == '__main__':
    main()
