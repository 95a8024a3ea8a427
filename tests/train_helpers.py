"""Shared helpers for the training tests: tiny configs and parameter comparisons."""
from __future__ import annotations

import os
import signal

import torch

from unitok.train import TrainConfig


def tiny_config(out, steps=4, **overrides) -> TrainConfig:
    """unitok-tiny on the built-in data, small batches, fp32, checkpoints and logs each step."""
    cfg = TrainConfig(out=str(out), steps=steps, precision='fp32', log_every=1, eval_every=0, image_every=0,
                      ckpt_every=0, keep_last=10)
    base = ['data.batch_size=8', 'data.num_workers=0', 'loss.discriminator=patchgan', 'loss.perceptual=effnet-lite0']
    return cfg.override(base + [f'{k}={v}' for k, v in overrides.items()])


def load_params(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location='cpu', weights_only=True)
    out = {f'model.{k}': v for k, v in state['model'].items()}
    if state.get('ema'):
        out.update({f'ema.{k}': v for k, v in state['ema']['shadow'].items()})
    for name, aux in state.get('aux', {}).items():
        out.update({f'{name}.{k}': v for k, v in aux['module'].items()})
    return out


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


def sigterm_at(trainer, step: int, monkeypatch) -> None:
    """Make ``trainer``'s task send this process SIGTERM during ``step``, as a scheduler would."""
    loss = trainer.task.loss

    def signalled(phase, batch, at):
        if at == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(phase, batch, at)
    monkeypatch.setattr(trainer.task, 'loss', signalled)
