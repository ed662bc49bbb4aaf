"""One inference engine for everything that generates: chat, API server, RL rollouts, eval, distillation."""

from .cache import LatentCache
from .engine import Engine, EngineBusy, Event, Request, generate
from .sampling import InvalidRequest, SamplingParams

__all__ = ["Engine", "EngineBusy", "Event", "InvalidRequest", "LatentCache", "Request", "SamplingParams", "generate"]
