"""Task families: problems phrased the ways people type them, held-out splits, worked solutions, verifiers.

These feed pretraining text, SFT conversations, RL prompts (the verifier is the reward's core)
and evaluation. `TASKS` maps a family name to a factory for its default configuration.
"""

from ...tokenizer import DeepSeekTokenizer
from .arithmetic import Addition, Multiplication, Subtraction
from .base import Problem, Task, parse_int
from .countdown import Countdown
from .equations import LinearEquation

TASKS = {"add": Addition, "sub": Subtraction, "mul": Multiplication, "countdown": Countdown,
         "linear": LinearEquation}


def get_task(name: str, **options) -> Task:
    """A family in its default configuration (the one evaluation asks), or with `options`."""
    if name not in TASKS:
        raise ValueError(f"unknown task family {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**options)


def token_budget(tok: DeepSeekTokenizer, family: str, n: int = 50) -> int:
    """A generation cap per family: 1.5x the longest worked solution among n held-out problems."""
    task = get_task(family)
    longest = max(len(tok.encode(task.solution(p) + p.answer)) for p in task.heldout(n))
    return int(1.5 * longest) + 16


__all__ = ["TASKS", "Addition", "Countdown", "LinearEquation", "Multiplication", "Problem", "Subtraction", "Task",
           "get_task", "parse_int", "token_budget"]
