"""The contract between the one training loop and a model's objective.

A task owns a model and everything specific to it (auxiliary networks, losses and their weights,
data preparation, validation, sample images, export). The loop (:mod:`unitok.train.loop`) owns the
mechanics every model needs: micro-batch accumulation, synchronisation, clipping, optimizer steps,
EMA, precision, cadence of validation / images / checkpoints, exact resume, signals and logging.

Each optimizer step runs the task's active :class:`Phase` s in order (the tokenizer: the generator,
then the discriminator). A phase's loss is computed micro-batch by micro-batch; a phase may leave
tensors in the micro-batch dict for a later phase of the same step (the discriminator reads the
generator's reconstructions that way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .schedule import cosine_factor


@dataclass
class Phase:
    """One optimizer over one module.

    Attributes:
        name: key in checkpoints ('model' is the task's main model) and prefix-free metric source.
        module: the unwrapped module whose parameters this phase updates (clipped as one set).
        optimizer: its optimizer.
        lr: step -> learning rate of each param group (the loop sets them before the step).
    """
    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    lr: Callable[[int], float]


class Task:
    """Base class of the per-model training objectives. Subclasses implement the methods below.

    Attributes set by subclasses in ``__init__``: ``cfg`` (a :class:`~unitok.train.config.RunConfig`),
    ``model`` (the unwrapped main model: EMA-averaged, checkpointed as 'model', exported).
    """
    name = 'task'
    cfg = None
    progress_keys: tuple[str, ...] = ('loss', 'lr')   # shown beside the progress bar
    model: nn.Module
    warmup_steps: int = 0
    _phases: list[Phase]

    def setup(self, strategy) -> None:
        """Build auxiliary modules on ``strategy.device``, wrap modules with ``strategy.wrap`` and
        create the optimizers; called once, after the model is on its device."""
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        """Every phase, in step order ('model' first): ``_phases``, which ``setup`` fills."""
        return self._phases

    def lr(self, step: int) -> float:
        """The main model's learning rate at ``step``: ``cfg.optim.lr`` under the warm-up (``warmup_steps``,
        set by ``setup``) and cosine schedule."""
        oc = self.cfg.optim
        return oc.lr * cosine_factor(step, self.cfg.steps, self.warmup_steps, oc.start_ratio, oc.end_ratio)

    def active(self, phase: Phase, step: int) -> bool:
        """Whether ``phase`` runs at ``step`` (default: always)."""
        return True

    def loss(self, phase: Phase, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of one micro-batch for ``phase`` and detached scalar metrics (tensors: the loop
        converts them to floats only when it logs)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After all optimizer steps of a step (e.g. clamp a temperature)."""

    def step_metrics(self, step: int) -> dict[str, float]:
        """Schedules and other per-step numbers to log (plain floats, no device sync)."""
        return {}

    # -- data
    def train_stream(self, rank: int, world_size: int, num_workers: int, start_positions: dict[int, int],
                     worker_offset: int):
        """A :class:`unitok.data.TrainStream` of this task's training samples."""
        raise NotImplementedError

    def to_device(self, batch: dict, device: torch.device) -> dict:
        """Move the tensors of a collated micro-batch to ``device``."""
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # -- validation, images, export
    def validate(self, strategy) -> dict[str, float]:
        """Held-out metrics (all ranks call it; reductions use ``strategy.process_group``)."""
        return {}

    def save_images(self, strategy, path: str, averaged=None) -> bool:
        """Write a PNG grid of samples / reconstructions to ``path`` (rank 0); ``averaged`` is a context
        manager factory that applies the EMA weights, or None. Returns True when written."""
        return False

    def export(self, state: dict, directory: str) -> None:
        """Save the final model from its full state dict (rank 0 only)."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Task state that is not a parameter, optimizer or RNG state (checkpointed)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def check_resume(self, saved_config: dict) -> None:
        """Raise a clear error when a checkpoint's config cannot continue in this task."""

    def describe(self) -> str:
        return self.name

    def default_parallel(self, info) -> str:
        """The parallelism for ``parallel: auto`` ('ddp' or 'fsdp')."""
        return 'ddp'
