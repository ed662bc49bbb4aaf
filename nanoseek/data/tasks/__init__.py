"""Task families: problems phrased the ways people type them, held-out splits, worked solutions, verifiers.

These feed pretraining text, SFT conversations, RL prompts (the verifier is the reward's core)
and evaluation. `TASKS` maps a family name to a factory for its default configuration.
"""

from .arithmetic import Addition, Multiplication, Subtraction
from .base import Problem, Task, parse_int
from .countdown import Countdown
from .equations import LinearEquation

TASKS = {"add": Addition, "sub": Subtraction, "mul": Multiplication, "countdown": Countdown,
         "linear": LinearEquation}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task family {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Addition", "Countdown", "LinearEquation", "Multiplication", "Problem", "Subtraction", "Task",
           "get_task", "parse_int"]
