"""``unitok demo``: UniTok end to end on a laptop-class CPU, on the built-in emoji dataset.

1. trains ``unitok-tiny`` (bf16 where the CPU has native bf16 matrix units), resuming if interrupted;
2. evaluates it on the held-out emoji (reconstruction, Fréchet distance of EfficientNet-Lite0
   features, zero-shot over the 9 emoji categories, retrieval, codebook health);
3. tokenises and reconstructs a few held-out images and writes codes and side-by-side PNGs;
4. writes the HTML report and prints where everything is.

The demo recipe keeps the official losses that pay off within minutes on two cores (L1 + L2 +
quantizer + CLIP) and leaves the perceptual and adversarial terms to full runs (``unitok train``
uses the complete official recipe by default): on this budget they cost more steps than they gain.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch

# 128 px (the 64 px emoji up-sampled): the 16x tokenizer then has an 8x8 token grid.
DEMO_OVERRIDES = ['model.image_size=128', 'loss.perceptual=none', 'loss.discriminator=none', 'optim.lr=1e-3',
                  'optim.warmup=0.02', 'data.batch_size=32', 'data.num_workers=1']


def native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX512-BF16): bf16 autocast then pays off."""
    checks = ('_is_amx_tile_supported', '_is_avx512_bf16_supported')
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def run(args) -> int:
    from .utils.io import atomic_write
    from .data import eval_transform, open_source
    from .eval import EvalConfig, run_evaluation
    from .images import side_by_side
    from .model import UniTok
    from .train import TrainConfig, Trainer
    from .train.run import holds_run

    out = os.path.abspath(args.out)
    t0 = time.time()
    precision = 'bf16' if (native_bf16() or torch.cuda.is_available()) and not args.fp32 else 'fp32'
    cfg = TrainConfig(preset='unitok-tiny', out=os.path.join(out, 'train'), steps=args.steps,
                      precision=precision, eval_every=max(1, args.steps // 6), image_every=max(1, args.steps // 3),
                      ckpt_every=max(1, args.steps // 4), log_every=25, seed=args.seed)
    cfg = cfg.override(DEMO_OVERRIDES + [f'data.train={args.data}'])
    trainer = Trainer(cfg)
    resume = 'latest' if trainer.checkpointer.latest() else None
    if resume is None and holds_run(cfg.out):
        # Interrupted before its first checkpoint: nothing to continue from, start that run afresh.
        shutil.rmtree(cfg.out)
    print(f'[demo] 1/3 training unitok-tiny on {args.data} for {args.steps} steps ({precision}, '
          f'{torch.get_num_threads()} threads){", resuming" if resume else ""} -> {cfg.out}', flush=True)
    summary = trainer.fit(resume=resume)
    if summary['exit'] != 'finished':
        print('[demo] interrupted; run the same command again to continue')
        return 143
    t_train = time.time() - t0

    model_dir = os.path.join(cfg.out, 'model')
    print('[demo] 2/3 evaluating on the held-out split', flush=True)
    report = run_evaluation(model_dir, args.data, os.path.join(out, 'report'),
                            EvalConfig(batch_size=64), name='unitok-tiny (demo)')

    print('[demo] 3/3 tokenising and reconstructing held-out images', flush=True)
    model = UniTok.from_pretrained(model_dir)
    source = open_source(args.data, 'val')
    picks = list(range(0, len(source), max(1, len(source) // 12)))[:12]
    x = torch.stack([eval_transform(model.config.image_size)(source.read(i)[0]) for i in picks])
    codes = model.encode(x)
    samples = os.path.join(out, 'samples')
    os.makedirs(samples, exist_ok=True)
    for i, image in zip(picks, side_by_side(x, model.decode(codes))):
        image.resize((image.width * 4, image.height * 4), resample=0).save(os.path.join(samples, f'val_{i:04d}.png'))
    atomic_write(os.path.join(samples, 'codes.npz'), lambda f: np.savez_compressed(
        f, codes=codes.numpy().astype(np.int16), keys=np.array([source.key(i) for i in picks]),
        captions=np.array([source.captions[i] for i in picks])))

    minutes = (time.time() - t0) / 60
    keys = ('psnr', 'ssim', 'rfid_effnet-lite0', 'zero_shot_top1', 'zero_shot_top5', 'recall@5', 'codebook_usage',
            'codebook_perplexity')
    result = {'train_minutes': t_train / 60, 'total_minutes': minutes, 'precision': precision, 'steps': args.steps,
              **{k: report[k] for k in keys if k in report}, 'zero_shot_chance': 1 / report.get('zero_shot_classes', 9)}
    with open(os.path.join(out, 'demo_summary.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f'[demo] done in {minutes:.1f} min (training {t_train / 60:.1f} min)')
    print('[demo] held-out: ' + ', '.join(f'{k} {result[k]:.4g}' for k in keys if k in result) +
          f' (zero-shot chance {result["zero_shot_chance"]:.3f})')
    print(f'[demo] report:          {os.path.join(out, "report", "report.html")}')
    print(f'[demo] reconstructions: {samples}/ (left: input, right: decode(encode(input)))')
    print(f'[demo] model:           {model_dir}')
    return 0


def register(sub) -> None:
    p = sub.add_parser('demo', help='train, evaluate and report unitok-tiny on the built-in data (CPU, minutes)',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='demo_output')
    p.add_argument('--data', default='builtin:emoji')
    p.add_argument('--steps', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--fp32', action='store_true', help='train in float32 even where bf16 is native')
    p.set_defaults(fn=run)
