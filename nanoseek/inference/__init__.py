"""One inference engine for everything that generates: chat, API server, RL rollouts, eval, distillation."""

from .cache import LatentCache
from .engine import generate

__all__ = ["LatentCache", "generate"]
