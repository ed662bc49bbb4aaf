"""Training: the one loop (loop.py), the run folder's lifecycle (runs.py) and the stages built on them."""

from .loop import Objective, Trainer, TrainConfig, lr_multiplier
from .losses import LMObjective
from .pretrain import DataConfig, pretrain

__all__ = ["DataConfig", "LMObjective", "Objective", "TrainConfig", "Trainer", "lr_multiplier", "pretrain"]
