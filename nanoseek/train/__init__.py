"""Training: the one loop (loop.py) and the stages built on it."""

from .loop import Objective, Trainer, TrainConfig, lr_multiplier
from .pretrain import DataConfig, LMObjective, pretrain

__all__ = ["DataConfig", "LMObjective", "Objective", "TrainConfig", "Trainer", "lr_multiplier", "pretrain"]
