"""``unitok demo``: UniTok end to end on a laptop-class CPU, on the built-in emoji dataset.

1. trains ``unitok-tiny`` (bf16 where the CPU has native bf16 matrix units), resuming if interrupted;
2. evaluates it on the held-out emoji (reconstruction, Fréchet distance of EfficientNet-Lite0
   features, zero-shot over the 9 emoji categories, retrieval, codebook health);
3. tokenises and reconstructs a few held-out images and writes codes and side-by-side PNGs;
4. generation on its codes: exports the training split's codes, trains a class-conditional
   ``gen-tiny`` generator on them (the 9 emoji categories), samples a row per category and adds the
   grid, with the share of samples that the tokenizer's zero-shot head puts in the requested category,
   to the report (``--gen-steps 0`` skips this stage);
5. writes the HTML report and prints where everything is.

The demo recipe keeps the official losses that pay off within minutes on two cores (L1 + L2 +
quantizer + CLIP) and leaves the perceptual and adversarial terms to full runs (``unitok train``
uses the complete official recipe by default): on this budget they cost more steps than they gain.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch

from ..data import eval_transform, open_source
from ..eval import EvalConfig, run_evaluation
from ..eval.generation import consistency, load_generator
from ..eval.report import add_section
from ..generation import ExportConfig, export_codes, generate
from ..images import make_grid, side_by_side, to_uint8_tensor
from ..model import UniTok
from ..precision import bf16_runs_in_hardware
from ..train import TrainConfig, fit_to_end
from ..train.tasks.generator import GenTrainConfig
from ..utils.io import atomic_write
from .args import add_command

# 128 px (the 64 px emoji up-sampled): the 16x tokenizer then has an 8x8 token grid.
DEMO_OVERRIDES = ['model.image_size=128', 'loss.perceptual=none', 'loss.discriminator=none', 'optim.lr=1e-3',
                  'optim.warmup=0.02', 'data.batch_size=32', 'data.num_workers=1']


def run(args) -> int:
    out = os.path.abspath(args.out)
    t0 = time.time()
    precision = 'bf16' if (bf16_runs_in_hardware('cpu') or torch.cuda.is_available()) and not args.fp32 else 'fp32'
    cfg = TrainConfig(preset='unitok-tiny', out=os.path.join(out, 'train'), steps=args.steps,
                      precision=precision, eval_every=max(1, args.steps // 6), image_every=max(1, args.steps // 3),
                      ckpt_every=max(1, args.steps // 4), log_every=25, seed=args.seed)
    cfg = cfg.override(DEMO_OVERRIDES + [f'data.train={args.data}'])
    summary = fit_to_end(cfg, lambda resuming: print(
        f'[demo] 1/4 training unitok-tiny on {args.data} for {args.steps} steps ({precision}, '
        f'{torch.get_num_threads()} threads){", resuming" if resuming else ""} -> {cfg.out}', flush=True))
    if summary['exit'] != 'finished':
        print('[demo] interrupted; run the same command again to continue')
        return 143
    t_train = time.time() - t0

    model_dir = os.path.join(cfg.out, 'model')
    print('[demo] 2/4 evaluating on the held-out split', flush=True)
    report = run_evaluation(model_dir, args.data, os.path.join(out, 'report'),
                            EvalConfig(batch_size=64), name='unitok-tiny (demo)')

    print('[demo] 3/4 tokenising and reconstructing held-out images', flush=True)
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

    generation = {}
    if args.gen_steps:
        t_gen = time.time()
        generation = demo_generation(model_dir, args.data, out, args.gen_steps, args.seed, precision, args.gen_limit)
        generation['gen_minutes'] = (time.time() - t_gen) / 60
        if generation.get('exit', 'finished') != 'finished':
            print('[demo] interrupted; run the same command again to continue')
            return 143

    minutes = (time.time() - t0) / 60
    keys = ('psnr', 'ssim', 'rfid_effnet-lite0', 'zero_shot_top1', 'zero_shot_top5', 'recall@5', 'codebook_usage',
            'codebook_perplexity')
    result = {'train_minutes': t_train / 60, 'total_minutes': minutes, 'precision': precision, 'steps': args.steps,
              **{k: report[k] for k in keys if k in report}, 'zero_shot_chance': 1 / report.get('zero_shot_classes', 9),
              **generation}
    with open(os.path.join(out, 'demo_summary.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f'[demo] done in {minutes:.1f} min (training {t_train / 60:.1f} min)')
    print('[demo] held-out: ' + ', '.join(f'{k} {result[k]:.4g}' for k in keys if k in result) +
          f' (zero-shot chance {result["zero_shot_chance"]:.3f})')
    if generation:
        print(f'[demo] generation: held-out NLL {generation["gen_nll"]:.3f} nats per sub-code (uniform '
              f'{generation["gen_nll_uniform"]:.3f}); zero-shot consistency of the samples '
              f'{generation["gen_consistency_zero_shot"]:.3f} (shuffled-label control '
              f'{generation["gen_control_zero_shot"]:.3f}, chance {generation["gen_chance"]:.3f})')
        print(f'[demo] samples:         {generation["gen_grid"]} (a row per category)')
    print(f'[demo] report:          {os.path.join(out, "report", "report.html")}')
    print(f'[demo] reconstructions: {samples}/ (left: input, right: decode(encode(input)))')
    print(f'[demo] model:           {model_dir}')
    return 0


GEN_OVERRIDES = ['data.batch_size=32', 'optim.lr=1e-3', 'log_every=25', 'image_every=0', 'data.num_workers=0']
GEN_SAMPLES = 8          # samples per category in the grid


def demo_generation(tokenizer_dir: str, data: str, out: str, steps: int, seed: int, precision: str,
                    limit: int | None = None) -> dict:
    """Stage 4: codes of the training split, a class-conditional ``gen-tiny`` trained on them, a grid of
    samples per category added to the report. Every part resumes or reuses what an earlier run finished.
    ``limit``: export only the first ``limit`` items of each split (quick tries)."""
    tokenizer = UniTok.from_pretrained(tokenizer_dir).eval()
    codes = {split: os.path.join(out, 'codes', split) for split in ('train', 'val')}
    print(f'[demo] 4/4 generation: exporting the codes of {data} -> {os.path.dirname(codes["train"])}', flush=True)
    for split, path in codes.items():
        export_codes(tokenizer, ExportConfig(data=data, split=split, precision=precision, limit=limit), path)
    cfg = GenTrainConfig(preset='gen-tiny', tokenizer=tokenizer_dir, out=os.path.join(out, 'generator'),
                         steps=steps, precision=precision, eval_every=steps, ckpt_every=max(1, steps // 3), seed=seed)
    cfg = cfg.override(GEN_OVERRIDES + [f'data.train={codes["train"]}', f'data.val={codes["val"]}'])
    summary = fit_to_end(cfg, lambda resuming: print(
        f'[demo]     training a class-conditional gen-tiny for {steps} steps{", resuming" if resuming else ""} '
        f'-> {cfg.out}', flush=True))
    if summary['exit'] != 'finished':
        return {'exit': summary['exit']}

    generator, tokenizer, info = load_generator(os.path.join(cfg.out, 'model'), tokenizer_dir)
    classnames = info['classnames']
    labels = torch.arange(len(classnames)).repeat_interleave(GEN_SAMPLES)
    with torch.no_grad():
        sampled_codes = generate(generator, labels, cfg_scale=1.0, generator=seed)     # guidance-free
        images = tokenizer.decode(sampled_codes).clamp(-1, 1)
        templates = getattr(open_source(data, 'val'), 'templates', None) or ('a photo of a {}.',)
        heads = tokenizer.zero_shot_classifier(classnames, templates)
        seen = to_uint8_tensor(images).float().div(127.5).sub(1)          # what the PNG holds
        predicted = (tokenizer.encode_image(seen) @ heads.to(seen.dtype)).argmax(1)
    agree, control = consistency(predicted, labels, seed)
    grid = make_grid([images[i:i + GEN_SAMPLES] for i in range(0, len(images), GEN_SAMPLES)])
    grid = grid.resize((grid.width * 2, grid.height * 2), resample=0)
    path = os.path.join(out, 'generation', 'samples_per_class.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: grid.save(f, format='PNG'))
    val = summary.get('val')
    if not val:                         # a rerun of a finished run trains nothing: its last held-out record
        with open(os.path.join(cfg.out, 'metrics.jsonl'), encoding='utf-8') as f:
            val = [r for r in map(json.loads, f) if r.get('kind') == 'val'][-1]
    result = {'gen_steps': steps, 'gen_nll': val['nll'], 'gen_nll_uniform': math.log(generator.config.codebook_size),
              'gen_consistency_zero_shot': agree, 'gen_control_zero_shot': control, 'gen_chance': 1 / len(classnames),
              'gen_grid': path, 'gen_model': os.path.join(cfg.out, 'model')}
    rows = ', '.join(f'{i + 1}: {name}' for i, name in enumerate(classnames))
    add_section(os.path.join(out, 'report'), 'Generation: samples of a class-conditional gen-tiny trained on these codes',
                grid, f'{steps} steps on the training split\'s codes, guidance-free sampling (temperature 1), '
                f'{GEN_SAMPLES} samples per category, one row per category ({rows}). Held-out NLL '
                f'{val["nll"]:.3f} nats per sub-code (uniform: {result["gen_nll_uniform"]:.3f}); the tokenizer\'s '
                f'zero-shot head puts {agree:.1%} of the samples in the requested category (shuffled-label '
                f'control {control:.1%}, chance {1 / len(classnames):.1%}).')
    return result


def register(sub) -> None:
    p = add_command(sub, 'demo', 'train, evaluate and report unitok-tiny on the built-in data (CPU, minutes)', __doc__)
    p.add_argument('--out', default='demo_output')
    p.add_argument('--data', default='builtin:emoji')
    p.add_argument('--steps', type=int, default=500)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--gen-steps', type=int, default=300,
                   help='training steps of the class-conditional generator on the codes (0: no generation stage)')
    p.add_argument('--gen-limit', type=int, default=None, help='export only the first N items of each split (quick tries)')
    p.add_argument('--fp32', action='store_true', help='train in float32 even where bf16 is native')
    p.set_defaults(fn=run)
