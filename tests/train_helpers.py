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


def uninterrupted_and_resumed(make_config, root, monkeypatch, stop_at: int = 2):
    """Two Trainers of ``make_config(out)``: one run straight through in ``root/ref``, one stopped by
    SIGTERM at ``stop_at`` and resumed from its latest checkpoint in ``root/cut``."""
    from unitok.train import Trainer
    ref = Trainer(make_config(root / 'ref'))
    ref.fit()
    cut = Trainer(make_config(root / 'cut'))
    sigterm_at(cut, stop_at, monkeypatch)
    assert cut.fit()['exit'] == 'signal SIGTERM'
    again = Trainer(make_config(root / 'cut'))
    again.fit(resume='latest')
    return ref, again


# The environment of a `unitok` subprocess in the tests: offline, one thread, unbuffered output.
CLI_ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def run_unitok(args: list[str], timeout: float = 600) -> str:
    """``unitok ARGS`` in a subprocess (one thread, offline) to its end; returns its output."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, '-m', 'unitok.cli', *args], env=CLI_ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def kill_9_then_resume(args: list[str], out, checkpoint: str, timeout: float = 600) -> str:
    """Run ``unitok ARGS --out OUT`` in a subprocess, SIGKILL it as soon as ``OUT/checkpoints/CHECKPOINT``
    exists (no handler runs, as after an OOM kill or a lost node), check that it really stopped before
    its end, then run ``unitok ARGS --out OUT --resume latest`` to the end; returns that run's output."""
    import subprocess
    import sys
    import time

    def start(extra):
        return subprocess.Popen([sys.executable, '-m', 'unitok.cli', *args, '--out', str(out), *extra], env=CLI_ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = start([])
    ckpt = os.path.join(str(out), 'checkpoints', checkpoint)
    deadline = time.time() + timeout
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert os.path.exists(ckpt), proc.stdout.read() if proc.poll() is not None else 'no checkpoint in time'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed: make it longer'
    resumed = start(['--resume', 'latest'])
    output = resumed.communicate(timeout=timeout)[0]
    assert resumed.returncode == 0, output
    assert 'resumed from' in output, output
    return output


TIMING_KEYS = ('time', 'sec_per_step', 'samples_per_sec')


def logged_rows(run_dir) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl`` without their timings (which differ between any two runs)."""
    import json
    with open(os.path.join(str(run_dir), 'metrics.jsonl'), encoding='utf-8') as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def saved_tiny_tokenizer(root):
    """A seeded random ``unitok-tiny`` tokenizer, saved to ``root/tokenizer`` and returned in eval mode
    (the tokenizer the code-export fixtures of the generator and MLLM tests encode with)."""
    import unitok
    torch.manual_seed(0)
    tok = unitok.create_model('unitok-tiny')
    tok.init_weights()
    tok.save_pretrained(str(root / 'tokenizer'))
    return tok.eval()
