"""The tokenizer's training task on its own: loss weights, schedules, held-out data, resume rules."""
import argparse
import json
import math

import pytest
import torch

from unitok.checkpoint import CheckpointError
from unitok.train import LossConfig, TrainConfig
from unitok.commands.train import resolve_config
from unitok.train.strategy import Strategy
from unitok.train.tasks.tokenizer import TokenizerTask, _held_out, generator_objective, reconstruction_objective

TERMS = dict(l1=torch.tensor(2.0), l2=torch.tensor(3.0), perceptual=torch.tensor(5.0), quantizer=torch.tensor(7.0),
             entropy=torch.tensor(11.0), clip=torch.tensor(13.0), g_loss=torch.tensor(17.0))


def test_loss_weights_combine_every_term_once():
    lc = LossConfig(l1=0.2, l2=1.0, perceptual_weight=0.5, quantizer=1.5, entropy=0.1, clip=2.0)
    assert float(reconstruction_objective(TERMS, lc)) == pytest.approx(0.2 * 2 + 3 + 0.5 * 5)
    total = generator_objective(TERMS, lc, gan_weight=0.25)
    assert float(total.detach()) == pytest.approx(0.2 * 2 + 3 + 0.5 * 5 + 1.5 * 7 + 0.1 * 11 + 2.0 * 13 + 0.25 * 17)


def _task(tmp_path, steps=100, **overrides):
    cfg = TrainConfig(out=str(tmp_path / 'run'), steps=steps).override(
        ['loss.perceptual=none', 'loss.discriminator=patchgan', 'data.num_workers=0'] +
        [f'{k}={v}' for k, v in overrides.items()])
    task = TokenizerTask(cfg)
    task.setup(Strategy())
    return task


def test_schedules_follow_the_official_recipe(tmp_path):
    task = _task(tmp_path, steps=100, **{'optim.warmup': 0.1, 'loss.disc_start': 0.5, 'loss.disc_warmup': 0.1})
    oc = task.cfg.optim
    assert task.lr(0) == pytest.approx(0.0) and task.lr(10) == pytest.approx(oc.lr)     # warm-up 10 steps
    assert task.lr(99) == pytest.approx(oc.lr * oc.end_ratio)
    # The discriminator: idle before step 50, its own warm-up of 10 steps, cosine to disc_end_ratio.
    model, disc = task.phases()
    assert not task.active(disc, 50) and task.active(disc, 51) and task.active(model, 0)
    assert task.disc_lr(50) == pytest.approx(0.0)
    assert task.disc_lr(55) == pytest.approx(oc.disc_lr * 0.5)
    assert task.disc_lr(60) == pytest.approx(oc.disc_lr)
    assert task.disc_lr(99) < oc.disc_lr * 0.2
    assert disc.lr == task.disc_lr and model.lr == task.lr
    ramp, blur = task.gan(55)
    assert ramp == pytest.approx(0.5) and blur == pytest.approx(0.75)


def test_generator_phase_reports_every_term_and_feeds_the_discriminator(tmp_path):
    task = _task(tmp_path, steps=10, **{'loss.disc_start': 0.0, 'data.batch_size': 2})
    model, disc = task.phases()
    stream = task.train_stream(0, 1, 0, {}, 0)
    samples = [s['sample'] for _, s in zip(range(2), iter(stream))]
    batch = {'image': torch.stack([s['image'] for s in samples]), 'text': torch.stack([s['text'] for s in samples])}
    total, m = task.loss(model, batch, step=5)
    expected = generator_objective({k: m[k] for k in TERMS}, task.cfg.loss, m['g_weight'])
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(m['g_weight']) > 0 and float(m['g_loss']) != 0          # the GAN term is on
    assert batch['fake'].shape == batch['image'].shape and not batch['fake'].requires_grad
    d_total, dm = task.loss(disc, batch, step=5)
    assert float(d_total.detach()) == pytest.approx(float(dm['d_loss'] + dm['bcr']))


def test_a_folder_without_a_validation_split_is_not_validated_on_training_images(tmp_path):
    from PIL import Image
    root = tmp_path / 'images'
    root.mkdir()
    for i in range(3):
        Image.new('RGB', (32, 32), (i * 40, 0, 0)).save(root / f'{i}.png')
    cfg = TrainConfig().override([f'data.train=folder:{root}'])
    source, note = _held_out(cfg.data)
    assert source is None and 'no validation split' in note
    (root / 'val').mkdir()
    Image.new('RGB', (32, 32)).save(root / 'val' / 'a.png')
    source, note = _held_out(cfg.data)
    assert source is not None and len(source) == 1


def _args(**kw):
    base = dict(config=None, preset=None, data=None, val_data=None, out=None, steps=None, batch_size=None,
                resume=None, init=None, overrides=[])
    return argparse.Namespace(**{**base, **kw})


def test_resume_takes_the_saved_config_and_applies_explicit_changes(tmp_path, caplog):
    run = tmp_path / 'run'
    saved = TrainConfig(out=str(run), steps=30).override(['data.batch_size=2', 'loss.perceptual=none'])
    run.mkdir()
    saved.save(str(run / 'config.yaml'))
    cfg = resolve_config(_args(out=str(run), resume='latest'))
    assert cfg == saved                                                  # not the defaults
    with caplog.at_level('INFO', logger='unitok.train'):
        cfg = resolve_config(_args(out=str(run), resume='latest', steps=60, overrides=['optim.lr=1e-3']))
    assert cfg.steps == 60 and cfg.optim.lr == 1e-3 and cfg.data.batch_size == 2
    assert "steps: 30 -> 60" in caplog.text and 'optim.lr' in caplog.text


def test_resume_refuses_another_architecture_with_a_clear_error(tmp_path):
    task = _task(tmp_path)
    other = TrainConfig(preset='unitok-tiny', model={'codebook_size': 256}).to_dict()
    with pytest.raises(CheckpointError, match='architecture differs.*codebook_size'):
        task.check_resume(other)
    task.check_resume(task.cfg.to_dict())                                  # the same: fine
