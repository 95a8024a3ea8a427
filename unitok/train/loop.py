"""The one training loop. Every model trains through it as a :class:`~unitok.train.task.Task`.

    trainer = Trainer(cfg, task)          # task=None: the task that matches the config's type
    summary = trainer.fit(resume='latest')

What the loop does, and nothing model-specific: micro-batch accumulation with gradient sync only on
the last micro-batch, precision (bf16/fp16 autocast, fp16 grad scaling), clipping, one optimizer step
per phase, EMA, skip of non-finite steps (never saved), validation / image / checkpoint cadence,
exact resume (weights, optimizers, EMA, RNG and data position of every rank), SIGTERM/SIGINT (a
checkpoint, then exit), and logging. Host-device syncs: one per phase per step (the finiteness of the
gradient norm, which also carries the stop flag across ranks) and the metrics at log time.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from contextlib import nullcontext

import torch

from ..data import ResumableBatches
from ..precision import bf16_runs_in_hardware
from ..utils.distributed import DistInfo
from ..utils.io import atomic_write
from .ema import EMA
from .logger import MetricsLogger
from .run import RunDirectory, holds_run
from .state import Checkpointer, TrainingState
from .strategy import build_strategy

log = logging.getLogger('unitok.train')


class NonFiniteStep(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg, task=None, info: DistInfo | None = None):
        cfg.validate()
        self.cfg, self.info = cfg, info or DistInfo()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)                     # identical initial weights on every rank
        if task is None:
            from .tasks import task_for
            task = task_for(cfg)
        self.task = task
        kind = cfg.parallel if cfg.parallel != 'auto' else task.default_parallel(self.info)
        self.strategy = build_strategy(kind, self.info)
        self.model = task.model.to(self.strategy.device).train()
        task.setup(self.strategy)
        self.phases = task.phases()
        torch.manual_seed(cfg.seed + 10_000 * self.info.rank)   # per-rank stream from here (augmentation, dropout)
        # After sharding, so that under FSDP2 the averages are sharded like the parameters.
        self.ema = EMA(self.model, cfg.optim.ema) if cfg.optim.ema > 0 else None
        self.scaler = torch.amp.GradScaler('cuda') if cfg.precision == 'fp16' and self.strategy.device.type == 'cuda' \
            else None
        self.data = ResumableBatches(
            lambda positions, offset: task.train_stream(self.info.rank, self.info.world_size, cfg.data.num_workers,
                                                        positions, offset),
            cfg.data.batch_size, cfg.data.num_workers)
        self.checkpointer = Checkpointer(os.path.join(cfg.out, 'checkpoints'), cfg.keep_last)
        self.state = TrainingState(self)
        self.step, self.nonfinite_steps, self.stop_signal, self._updated = 0, 0, None, False

    def autocast(self):
        if self.cfg.precision == 'fp32':
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == 'bf16' else torch.float16
        return torch.autocast(self.strategy.device.type, dtype=dtype)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor | float]:
        step, n = self.step, len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor | float] = dict(self.task.step_metrics(step))
        stop = self.stop_signal is not None
        self._updated = False                   # whether an optimizer stepped (a failure then leaves no step)
        try:
            for phase in self.phases:
                if not self.task.active(phase, step):
                    continue
                lr = phase.lr(step)
                for group in phase.optimizer.param_groups:
                    group['lr'] = lr
                for i, batch in enumerate(micro_batches):
                    with self.strategy.no_sync(phase.module, sync=i == n - 1):
                        with self.autocast():
                            loss, parts = self.task.loss(phase, batch, step)
                        loss = loss / n
                        (self.scaler.scale(loss) if self.scaler else loss).backward()
                    for k, v in parts.items():
                        sums[k] = sums[k] + v if k in sums else v
                if self.scaler:
                    self.scaler.unscale_(phase.optimizer)
                norm = self.strategy.clip_grad_norm_(phase.module, self.cfg.optim.grad_clip)
                nonfinite, stop = self._flags(~torch.isfinite(norm), stop)
                if nonfinite:
                    raise NonFiniteStep(f'non-finite {phase.name} gradient norm at step {step}')
                self._updated = True
                (self.scaler.step if self.scaler else lambda opt: opt.step())(phase.optimizer)
                prefix = '' if phase.name == 'model' else f'{phase.name}_'
                metrics[f'{prefix}grad_norm'], metrics[f'{prefix}lr'] = norm.detach(), lr
        except NonFiniteStep as e:
            self.nonfinite_steps += 1
            log.warning('%s: step skipped (%d skipped so far)', e, self.nonfinite_steps)
            metrics = {'nonfinite': 1.0}
            sums = {}
        finally:
            for phase in self.phases:
                phase.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()
        if stop and self.stop_signal is None:           # another rank was signalled
            self.stop_signal = signal.SIGTERM
        if 'nonfinite' not in metrics:
            self.task.after_step(step)
            if self.ema is not None:
                self.ema.update(self.model)
        metrics.update({k: v / n for k, v in sums.items()})
        return metrics

    def _flags(self, nonfinite: torch.Tensor, stop: bool) -> tuple[bool, bool]:
        """Both flags, true on every rank when true on any (one small all-reduce, or none alone)."""
        if not self.info.enabled:
            return bool(nonfinite), stop
        t = torch.stack([nonfinite.float().reshape(()), torch.tensor(float(stop), device=nonfinite.device)])
        self.strategy.all_reduce(t)
        a, b = t.tolist()
        return a > 0, b > 0

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: str | None = None) -> dict:
        cfg, task = self.cfg, self.task
        run = RunDirectory(cfg.out, self.info.is_main)
        if resume == 'latest' and not holds_run(cfg.out) and self.checkpointer.latest() is None:
            log.warning('%s: no checkpoint (the run stopped before its first one): starting it from step 0',
                        cfg.out)
            resume = None
        run.acquire(resuming=bool(resume))
        try:
            if resume:
                self.state.load(resume)
            else:
                run.clear_leftovers()
            if self.info.is_main:
                cfg.save(os.path.join(cfg.out, 'config.yaml'))
            return self._fit()
        finally:
            run.release()

    def _fit(self) -> dict:
        cfg, task = self.cfg, self.task
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        logger = MetricsLogger(cfg.out, self.info.is_main, cfg.steps, self.step,
                               wandb_config=cfg.to_dict() if cfg.wandb else None)
        if self.info.is_main:
            log.info('%s; %s; %s', task.describe(), self.strategy.describe(), cfg.precision)
            if cfg.precision == 'bf16' and not bf16_runs_in_hardware(self.strategy.device):
                log.warning('precision bf16 on %s, which has no bf16 units (on a CPU: AVX512-BF16 or AMX): PyTorch '
                            'emulates bf16 matmuls there, several times slower than fp32; consider precision=fp32',
                            self.strategy.device)
        t_start, window, exit_reason, postfix = time.time(), [], 'finished', {}
        try:
            last_val = self._validate(logger) if self.step == 0 and cfg.eval_every else {}
            while self.step < cfg.steps:
                t0 = time.time()
                try:
                    metrics = self.train_step(self._next_micro_batches())
                except Exception:
                    self._keep_progress()
                    raise
                self.step += 1
                window.append(time.time() - t0)
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    metrics = _floats(metrics)
                    metrics.update(skipped_samples=self.data.skipped, sec_per_step=sum(window) / len(window))
                    metrics['samples_per_sec'] = cfg.data.batch_size * cfg.optim.grad_accum * \
                        self.info.world_size / metrics['sec_per_step']
                    window = []
                    logger.log(self.step, metrics)
                    postfix = {k: metrics[k] for k in task.progress_keys if k in metrics}
                logger.progress(self.step, postfix)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    last_val = self._validate(logger)
                if cfg.image_every and self.step % cfg.image_every == 0:
                    self._images(logger)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if self.stop_signal is not None:
                    exit_reason = f'signal {signal.Signals(self.stop_signal).name}'
                    break
        except BaseException:
            logger.close()
            raise
        finally:
            self.data.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        try:
            path = self.save_checkpoint()
        except BaseException:                   # a full disk: the error names the file, the logs are closed
            logger.close()
            raise
        if exit_reason == 'finished':
            self.export(os.path.join(cfg.out, 'model'))
            if cfg.eval_every and self.step % cfg.eval_every:
                last_val = self._validate(logger)
            if cfg.image_every and self.step % cfg.image_every:
                self._images(logger)
        logger.close()
        summary = {'exit': exit_reason, 'step': self.step, 'checkpoint': path, 'minutes': (time.time() - t_start) / 60,
                   'skipped_samples': self.data.skipped, 'skipped_examples': self.data.skipped_examples[:10],
                   'nonfinite_steps': self.nonfinite_steps, 'val': last_val,
                   'model': os.path.join(cfg.out, 'model') if exit_reason == 'finished' else None}
        if self.info.is_main:
            atomic_write(os.path.join(cfg.out, 'summary.json'), lambda f: json.dump(summary, f, indent=2), mode='w')
            log.info(', '.join(f'{k} {v}' for k, v in summary.items() if k != 'val'))
            if last_val:
                log.info('held-out: ' + ', '.join(f'{k} {v:.4g}' for k, v in last_val.items()
                                                  if isinstance(v, (int, float))))
        return summary

    def _next_micro_batches(self) -> list[dict]:
        return [self.task.to_device(next(self.data), self.strategy.device) for _ in range(self.cfg.optim.grad_accum)]

    def _keep_progress(self) -> None:
        """A step failed (bad data, an error in the task): checkpoint the steps done before it, as a signal
        does, when the weights are still those of the last finished step (no optimizer stepped yet) and in
        a single process (other ranks would wait in the checkpoint's collectives)."""
        if self.info.enabled or self._updated or self.step == 0 or \
                os.path.exists(self.checkpointer.path(self.step)):
            return
        log.error('step %d failed: writing the checkpoint of the %d steps done first', self.step + 1, self.step)
        try:
            self.save_checkpoint()
        except Exception as e:                   # the step's own error is the one to report
            log.error('the checkpoint could not be written either: %s', e)

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt            # a second Ctrl-C: stop now (a checkpoint is still written)
        self.stop_signal = signum
        log.warning('%s received: stopping after this step with a checkpoint', signal.Signals(signum).name)

    def _validate(self, logger) -> dict:
        was_training = self.model.training
        self.model.eval()
        try:
            result = self.task.validate(self.strategy)
        finally:
            self.model.train(was_training)
        if result:
            logger.log(self.step, result, kind='val')
        return result

    def _images(self, logger) -> None:
        path = os.path.join(self.cfg.out, 'images', f'step_{self.step:08d}.png')
        averaged = (lambda: self.ema.applied(self.model)) if self.ema is not None else None
        self.model.eval()
        try:
            written = self.task.save_images(self.strategy, path, averaged)
        finally:
            self.model.train()
        if written:
            logger.image(self.step, 'samples', path)

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self) -> str | None:
        return self.state.save()

    def export(self, directory: str) -> None:
        """Save the EMA model (or the raw one without EMA) through the task."""
        with self.ema.applied(self.model) if self.ema is not None else nullcontext():
            state = self.strategy.full_state_dict(self.model)
        if self.info.is_main:
            self.task.export(state, directory)
        self.strategy.barrier()


def fit_to_end(cfg, announce=None) -> dict:
    """Train ``cfg``'s run to its last step, the way a re-runnable script wants it: continue from the
    run's latest checkpoint; a run directory interrupted before its first checkpoint has nothing to
    continue from and is started afresh. ``announce(resuming: bool)`` is called before training (a
    progress line). Returns :meth:`Trainer.fit`'s summary (``summary['exit']``: ``'finished'`` or why not)."""
    trainer = Trainer(cfg)
    resume = 'latest' if trainer.checkpointer.latest() else None
    if resume is None and holds_run(cfg.out):
        shutil.rmtree(cfg.out)
    if announce is not None:
        announce(resume is not None)
    return trainer.fit(resume=resume)


def _floats(metrics: dict) -> dict[str, float]:
    """Tensors -> floats in one device transfer (the log-time sync)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if k not in keys}
    if keys:
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, values))
    return out
