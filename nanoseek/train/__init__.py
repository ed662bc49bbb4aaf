"""Training: the one loop (loop.py), the run folder's lifecycle (runs.py), the stages built on them
(pretrain.py, sft.py, grpo.py, distill.py) and their settings (settings.py, torch-free; the loop's
names load on first use)."""

from importlib import import_module

from .settings import DataConfig, TrainConfig

_LAZY = {"Objective": ".loop", "Trainer": ".loop", "lr_multiplier": ".loop", "LMObjective": ".losses"}

__all__ = ["DataConfig", "TrainConfig", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_LAZY[name], __name__), name)
