"""Training: one loop (:mod:`.loop`) for every model, a parallelism strategy (:mod:`.strategy`),
and one task per model (:mod:`.tasks`); configs, run directories, checkpoints, EMA and logs."""
from .config import BaseOptimConfig, DataConfig, LossConfig, OptimConfig, RunConfig, TrainConfig
from .loop import Trainer, fit_to_end
from .task import Phase, Task
from .tasks import TokenizerTask

__all__ = ['Trainer', 'fit_to_end', 'Task', 'Phase', 'TokenizerTask', 'RunConfig', 'TrainConfig', 'DataConfig', 'LossConfig',
           'OptimConfig', 'BaseOptimConfig']
