"""The one training loop, on a toy task (seconds): accumulation, clipping, EMA export, non-finite
skips, exact resume, the run directory rules, signals and data failures."""
import json
import os
import signal
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

from unitok.data import DataError, TrainStream
from unitok.train import Phase, RunConfig, Task, Trainer
from unitok.train.config import BaseOptimConfig
from unitok.train.run import RunDirectory, RunDirectoryError
from unitok.train.state import check_training_checkpoint
from unitok.checkpoint import CheckpointError


@dataclass
class ToyData:
    batch_size: int = 4
    num_workers: int = 0


@dataclass
class ToyConfig(RunConfig):
    data: ToyData = field(default_factory=ToyData)
    optim: BaseOptimConfig = field(default_factory=lambda: BaseOptimConfig(lr=0.05, ema=0.9, grad_clip=0.0))


class Points:
    """A map-style source of fixed random (x, y) pairs; ``bad`` indices are unreadable."""

    def __init__(self, n=64, bad=()):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)
        self.bad = set(bad)

    def __len__(self):
        return len(self.x)

    def read(self, i):
        if i in self.bad or 'all' in self.bad:
            raise ValueError(f'sample {i} is unreadable')
        return self.x[i], self.y[i]

    def key(self, i):
        return f'point-{i}'


class ToyTask(Task):
    name = 'toy'

    def __init__(self, cfg, source=None, nan_at=None, signal_at=None):
        self.cfg, self.source, self.nan_at, self.signal_at = cfg, source or Points(), nan_at, signal_at
        torch.manual_seed(cfg.seed)
        self.model = nn.Linear(3, 1)
        self.exported = None

    def setup(self, strategy):
        self.wrapped = strategy.wrap(self.model)
        opt = torch.optim.SGD(self.model.parameters(), lr=self.cfg.optim.lr)
        self._phases = [Phase('model', self.model, opt, lambda step: self.cfg.optim.lr)]

    def phases(self):
        return self._phases

    def loss(self, phase, batch, step):
        err = self.wrapped(batch['x']).squeeze(-1) - batch['y']
        loss = err.square().mean()
        if step == self.nan_at:
            loss = loss * float('nan')
        if step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)      # as `timeout` or a scheduler would
        return loss, {'loss': loss.detach()}

    def train_stream(self, rank, world_size, num_workers, start_positions, worker_offset):
        return TrainStream(self.source, prepare=lambda raw: {'x': raw[0], 'y': raw[1]}, seed=self.cfg.seed, rank=rank,
                           world_size=world_size, num_workers=num_workers, start_positions=start_positions,
                           worker_offset=worker_offset, max_failures=50)

    def export(self, state, directory):
        self.exported = {k: v.clone() for k, v in state.items()}


def toy(tmp_path, name='run', **kw):
    settings = dict(log_every=1, eval_every=0, image_every=0, ckpt_every=0, keep_last=10, precision='fp32')
    return ToyConfig(out=str(tmp_path / name), **{**settings, **kw})


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_toy_task_learns_and_exports_the_ema_weights(tmp_path):
    task = ToyTask(toy(tmp_path, steps=60))
    trainer = Trainer(task.cfg, task)
    summary = trainer.fit()
    assert summary['exit'] == 'finished' and summary['step'] == 60
    weight = task.model.weight.detach().flatten()
    assert torch.allclose(weight, torch.tensor([1.0, -2.0, 0.5]), atol=0.1)      # it learned
    # The exported model is the EMA average, not the raw weights (which differ after SGD noise).
    shadow = dict(zip(trainer.ema.names, trainer.ema.shadow))
    assert torch.equal(task.exported['weight'], shadow['weight'])
    assert not torch.equal(task.exported['weight'], task.model.weight.detach())


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """2 micro-batches of 4 == 1 batch of 8 (same samples: the stream is a function of the position)."""
    a = ToyTask(toy(tmp_path, 'a', steps=5, data=ToyData(batch_size=8)))
    cfg_b = toy(tmp_path, 'b', steps=5, data=ToyData(batch_size=4))
    cfg_b.optim.grad_accum = 2
    b = ToyTask(cfg_b)
    Trainer(a.cfg, a).fit()
    Trainer(b.cfg, b).fit()
    assert torch.allclose(params(a.model), params(b.model), atol=1e-6)


def test_clipping_bounds_the_update(tmp_path):
    cfg = toy(tmp_path, steps=1)
    cfg.optim.grad_clip, cfg.optim.ema = 1e-3, 0.0
    task = ToyTask(cfg)
    before = params(task.model).clone()
    Trainer(cfg, task).fit()
    step = (params(task.model) - before).norm()
    assert step <= cfg.optim.lr * 1e-3 * 1.0001


def test_non_finite_step_is_skipped(tmp_path):
    task = ToyTask(toy(tmp_path, steps=3), nan_at=1)
    summary = Trainer(task.cfg, task).fit()
    assert summary['nonfinite_steps'] == 1
    assert torch.isfinite(params(task.model)).all()


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    ref = ToyTask(toy(tmp_path, 'ref', steps=8))
    Trainer(ref.cfg, ref).fit()
    cut = ToyTask(toy(tmp_path, 'cut', steps=8, ckpt_every=0), signal_at=2)
    summary = Trainer(cut.cfg, cut).fit()
    assert summary['exit'] == 'signal SIGTERM' and summary['step'] == 3          # the step in flight finishes
    assert summary['checkpoint'].endswith('step_00000003.pt') and summary['model'] is None
    again = ToyTask(toy(tmp_path, 'cut', steps=8))
    summary = Trainer(again.cfg, again).fit(resume='latest')
    assert summary['exit'] == 'finished'
    assert torch.equal(params(again.model), params(ref.model))
    assert torch.equal(again.exported['weight'], ref.exported['weight'])


def test_fresh_run_into_an_existing_run_is_refused(tmp_path):
    task = ToyTask(toy(tmp_path, steps=2))
    Trainer(task.cfg, task).fit()
    before = sorted(os.listdir(tmp_path / 'run' / 'checkpoints'))
    again = ToyTask(toy(tmp_path, steps=2))
    with pytest.raises(RunDirectoryError, match='already holds a training run'):
        Trainer(again.cfg, again).fit()
    assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == before


def test_a_second_process_cannot_take_the_run_directory(tmp_path):
    first = RunDirectory(str(tmp_path / 'run'))
    first.acquire(resuming=False)
    try:
        with pytest.raises(RunDirectoryError, match='in use by another training process'):
            RunDirectory(str(tmp_path / 'run')).acquire(resuming=True)
    finally:
        first.release()
    RunDirectory(str(tmp_path / 'run')).acquire(resuming=True)      # free again after release


def test_unusable_data_stops_with_a_clear_error(tmp_path):
    task = ToyTask(toy(tmp_path, steps=3), source=Points(bad=('all',)))
    with pytest.raises(DataError, match='unreadable samples in a row'):
        Trainer(task.cfg, task).fit()


def test_some_unreadable_samples_are_skipped_and_counted(tmp_path):
    task = ToyTask(toy(tmp_path, steps=4), source=Points(bad=(1, 2, 3)))
    summary = Trainer(task.cfg, task).fit()
    assert summary['exit'] == 'finished' and summary['skipped_samples'] >= 1
    assert any('point-' in k for k in summary['skipped_examples'])


def test_resume_refuses_files_that_are_not_training_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match='official UniTok release'):
        check_training_checkpoint({'args': {}, 'trainer': {}}, 'unitok.pth')
    with pytest.raises(CheckpointError, match='not a unitok training checkpoint'):
        check_training_checkpoint({'weights': 1}, 'x.pt')
    task = ToyTask(toy(tmp_path, steps=1))
    torch.save({'args': {}, 'trainer': {}}, tmp_path / 'official.pth')
    with pytest.raises(CheckpointError, match='official UniTok release'):
        Trainer(task.cfg, task).fit(resume=str(tmp_path / 'official.pth'))


def test_every_phase_gets_its_own_scheduled_learning_rate(tmp_path):
    """A second phase (as the tokenizer's discriminator) runs its own optimizer at its own schedule."""
    class TwoPhases(ToyTask):
        def setup(self, strategy):
            super().setup(strategy)
            self.head = nn.Linear(1, 1)
            self.seen = []
            opt = torch.optim.SGD(self.head.parameters(), lr=123.0)
            self._phases.append(Phase('head', self.head, opt, lambda step: 0.01 * (step + 1)))

        def active(self, phase, step):
            return phase.name == 'model' or step >= 2

        def loss(self, phase, batch, step):
            if phase.name == 'model':
                return super().loss(phase, batch, step)
            self.seen.append((step, phase.optimizer.param_groups[0]['lr']))
            return self.head(batch['y'][:, None]).square().mean(), {'head_loss': torch.zeros(())}

    task = TwoPhases(toy(tmp_path, steps=5))
    Trainer(task.cfg, task).fit()
    assert [s for s, _ in task.seen] == [2, 3, 4]
    assert [lr for _, lr in task.seen] == pytest.approx([0.03, 0.04, 0.05])


@pytest.mark.parametrize('has_units', [True, False])
def test_bf16_on_a_device_without_bf16_units_is_warned_about(tmp_path, monkeypatch, caplog, has_units):
    import unitok.train.loop as loop_module
    asked = []
    monkeypatch.setattr(loop_module, 'bf16_runs_in_hardware', lambda device: asked.append(device) or has_units)
    task = ToyTask(toy(tmp_path, steps=2, precision='bf16'))
    with caplog.at_level('WARNING', logger='unitok.train'):
        assert Trainer(task.cfg, task).fit()['exit'] == 'finished'
    warned = [r for r in caplog.records if 'no bf16 units' in r.getMessage()]
    assert asked == [torch.device('cpu')] and len(warned) == (0 if has_units else 1)


def test_a_run_stopped_before_its_first_checkpoint_is_no_run(tmp_path):
    """config.yaml, an empty metrics.jsonl and tensorboard/ are left by a run that failed at once: the same
    command starts it again, and so does --resume latest (from step 0), each step logged once."""
    task = ToyTask(toy(tmp_path, steps=3), source=Points(bad=('all',)))
    with pytest.raises(DataError):
        Trainer(task.cfg, task).fit()
    run = tmp_path / 'run'
    assert (run / 'config.yaml').exists() and not (run / 'checkpoints').exists()
    (run / 'metrics.jsonl').write_text('{"step": 1, "kind": "train", "loss": 9.0}\n')     # a stale row
    again = ToyTask(toy(tmp_path, steps=3))
    assert Trainer(again.cfg, again).fit()['exit'] == 'finished'
    steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert steps == [1, 2, 3]
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'config.yaml').write_text('')
    resumed = ToyTask(toy(tmp_path, 'other', steps=2))
    summary = Trainer(resumed.cfg, resumed).fit(resume='latest')
    assert summary['exit'] == 'finished' and summary['step'] == 2


class FailsAt(ToyTask):
    def loss(self, phase, batch, step):
        if step == self.nan_at:
            raise ValueError(f'bad item at step {step}')
        return super().loss(phase, batch, step)


def test_a_step_that_fails_mid_run_checkpoints_the_steps_before_it(tmp_path):
    task = FailsAt(toy(tmp_path, steps=5), nan_at=3)                   # steps 0..2 done, the 4th fails
    with pytest.raises(ValueError, match='bad item at step 3'):
        Trainer(task.cfg, task).fit()
    assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['step_00000003.pt']
    again = ToyTask(toy(tmp_path, steps=5))
    assert Trainer(again.cfg, again).fit(resume='latest')['step'] == 5
