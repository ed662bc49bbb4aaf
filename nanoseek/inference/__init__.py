"""One inference engine for everything that generates: chat, API server, RL rollouts, eval, distillation."""

from .cache import KVCache
from .engine import ContextOverflow, Engine, EngineBusy, Event, Request, generate
from .sampling import InvalidRequest, SamplingParams

__all__ = ["ContextOverflow", "Engine", "EngineBusy", "Event", "InvalidRequest", "KVCache", "Request", "SamplingParams",
           "generate"]
