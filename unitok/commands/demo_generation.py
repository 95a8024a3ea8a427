"""Stage 4 of ``unitok demo``: a class-conditional generator on the tokenizer's codes, its samples
judged by the tokenizer's own zero-shot head (with a shuffled-label control), a grid in the report."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from ..data import open_source
from ..eval.generation import consistency, load_generator
from ..eval.report import add_section
from ..generation import ExportConfig, export_codes, generate
from ..images import make_grid, to_uint8_tensor
from ..model import UniTok
from ..train import fit_to_end
from ..train.tasks.generator import GenTrainConfig
from ..utils.io import atomic_write
from .demo_recipes import DemoRecipe


def demo_generation(tokenizer_dir: str, data: str, out: str, recipe: DemoRecipe, steps: int, seed: int,
                    precision: str, limit: int | None = None, stages: dict | None = None) -> dict:
    """Codes of the training split, a class-conditional generator trained on them, samples per category
    judged and drawn into the report. Every part resumes or reuses what an earlier run finished.
    ``limit``: export only the first ``limit`` items of each split (quick tries); ``stages``: gets the
    minutes of the export, the training and the sampling."""
    stages = {} if stages is None else stages
    t = time.time()
    tokenizer = UniTok.from_pretrained(tokenizer_dir).eval()
    codes = {split: os.path.join(out, 'codes', split) for split in ('train', 'val')}
    print(f'[demo] 4/4 generation: exporting the codes of {data} -> {os.path.dirname(codes["train"])}', flush=True)
    for split, path in codes.items():
        export_codes(tokenizer, ExportConfig(data=data, split=split, precision=precision, limit=limit), path)
    stages['export_codes'] = (time.time() - t) / 60
    t = time.time()
    cfg = GenTrainConfig(preset=recipe.gen_preset, tokenizer=tokenizer_dir, out=os.path.join(out, 'generator'),
                         steps=steps, precision=precision, eval_every=steps, ckpt_every=max(1, steps // 3), seed=seed)
    cfg = cfg.override(recipe.generator_overrides() + [f'data.train={codes["train"]}', f'data.val={codes["val"]}'])
    summary = fit_to_end(cfg, lambda resuming: print(
        f'[demo]     training a class-conditional {recipe.gen_preset} for {steps} steps'
        f'{", resuming" if resuming else ""} -> {cfg.out}', flush=True))
    if summary['exit'] != 'finished':
        return {'exit': summary['exit']}
    stages['train_generator'] = (time.time() - t) / 60

    t = time.time()
    generator, tokenizer, info = load_generator(os.path.join(cfg.out, 'model'), tokenizer_dir)
    classnames = info['classnames']
    templates = getattr(open_source(data, 'val'), 'templates', None) or ('a photo of a {}.',)
    judged = judge_samples(generator, tokenizer, classnames, templates, recipe, seed)
    stages['sample_and_judge'] = (time.time() - t) / 60
    path = os.path.join(out, 'generation', 'samples_per_class.png')
    _write_grid(judged.pop('images'), recipe.samples_per_class, tokenizer.config.image_size, path)
    val = summary.get('val')
    if not val:                         # a rerun of a finished run trains nothing: its last held-out record
        with open(os.path.join(cfg.out, 'metrics.jsonl'), encoding='utf-8') as f:
            val = [r for r in map(json.loads, f) if r.get('kind') == 'val'][-1]
    result = {'gen_steps': steps, 'gen_nll': val['nll'], 'gen_nll_uniform': math.log(generator.config.codebook_size),
              **judged, 'gen_chance': 1 / len(classnames), 'gen_grid': path, 'gen_model': os.path.join(cfg.out, 'model')}
    rows = ', '.join(f'{i + 1}: {name}' for i, name in enumerate(classnames))
    from PIL import Image
    add_section(os.path.join(out, 'report'), f'Generation: samples of a class-conditional {recipe.gen_preset} '
                'trained on these codes', Image.open(path),
                f'{steps} steps on the training split\'s codes, guidance {recipe.guidance:g}, temperature '
                f'{recipe.temperature:g}, {recipe.samples_per_class} samples per category, one row per category '
                f'({rows}). Held-out NLL {val["nll"]:.3f} nats per sub-code (uniform: {result["gen_nll_uniform"]:.3f}); '
                f'the tokenizer\'s zero-shot head puts {judged["gen_consistency_zero_shot"]:.1%} of '
                f'{judged["gen_judged"]} samples in the requested category (shuffled-label control '
                f'{judged["gen_control_zero_shot"]:.1%}, chance {1 / len(classnames):.1%}).')
    return result


def judge_samples(generator, tokenizer: UniTok, classnames: list[str], templates, recipe: DemoRecipe,
                  seed: int, guidance: float | None = None) -> dict:
    """``recipe.judged_per_class`` samples per class at ``guidance`` (default: the recipe's), and the share
    the tokenizer's zero-shot head puts in the requested class, beside a shuffled-label control. The
    samples are judged as the PNG holds them (uint8). ``images``: the first ``samples_per_class`` of each
    class, for the grid."""
    guidance = recipe.guidance if guidance is None else guidance
    per = max(recipe.judged_per_class, recipe.samples_per_class)
    labels = torch.arange(len(classnames)).repeat_interleave(per)
    with torch.no_grad():
        heads = tokenizer.zero_shot_classifier(classnames, templates)
        images, predicted = [], []
        for chunk in labels.split(72):           # bounded memory; chunk i draws from seed + i
            sampled = generate(generator, chunk, cfg_scale=guidance, temperature=recipe.temperature,
                               top_k=recipe.top_k, generator=seed + len(images))
            decoded = tokenizer.decode(sampled).clamp(-1, 1)
            seen = to_uint8_tensor(decoded).float().div(127.5).sub(1)          # what the PNG holds
            predicted.append((tokenizer.encode_image(seen) @ heads.to(seen.dtype)).argmax(1))
            images.append(decoded)
    images, predicted = torch.cat(images), torch.cat(predicted)
    agree, control = consistency(predicted, labels, seed)
    shown = images.view(len(classnames), per, *images.shape[1:])[:, :recipe.samples_per_class]
    return {'gen_guidance': guidance, 'gen_temperature': recipe.temperature, 'gen_top_k': recipe.top_k,
            'gen_judged': len(labels), 'gen_consistency_zero_shot': agree, 'gen_control_zero_shot': control,
            'images': shown}


def _write_grid(images: torch.Tensor, per_class: int, image_size: int, path: str) -> None:
    """A row per class, shown at about 256 px per sample."""
    grid = make_grid(list(images))
    scale = max(1, 256 // image_size)
    grid = grid.resize((grid.width * scale, grid.height * scale), resample=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: grid.save(f, format='PNG'))
