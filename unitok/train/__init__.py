"""Training UniTok: config, trainer, checkpoints, distributed helpers."""
from .config import DataConfig, LossConfig, OptimConfig, TrainConfig
from .trainer import Trainer

__all__ = ['TrainConfig', 'DataConfig', 'LossConfig', 'OptimConfig', 'Trainer']
