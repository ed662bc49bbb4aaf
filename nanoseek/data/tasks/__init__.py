"""Task families: problems phrased the ways people type them, held-out splits, worked solutions, verifiers.

These feed pretraining text, SFT conversations, RL prompts (the verifier is the reward's core)
and evaluation. `TASKS` maps a family name to a factory for its default configuration.
"""

import random
from functools import lru_cache

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


WORDINGS = ("canonical", "varied", "held-out")  # how evaluation asks: see problems_for


@lru_cache(maxsize=16)
def problems_for(family: str, n: int, wording: str = "canonical", seed: int = 1234) -> tuple[Task, tuple[Problem, ...]]:
    """n held-out problems of a family, each asked in the canonical wording, in a random wording
    from the trained templates ("varied"), or from the templates training never sees ("held-out").
    Kept for the next caller (`nanoseek eval` draws them before the model loads, to refuse at once an --n
    the family's pool cannot give: ValueError)."""
    if wording not in WORDINGS:
        raise ValueError(f"wording must be one of {WORDINGS}, got {wording!r}")
    task = get_task(family)
    problems = task.heldout(n, seed=seed, canonical=True)
    if wording != "canonical":  # reword each held-out problem
        rng = random.Random(seed)
        templates = "test" if wording == "held-out" else "train"
        problems = [Problem(p.family, question, p.answer, p.data, frame)
                    for p in problems for question, frame in [task.ask(p.data, rng, templates)]]
    return task, tuple(problems)


def token_budget(tok: DeepSeekTokenizer, family: str, n: int = 50) -> int:
    """A generation cap per family: 1.5x the longest worked solution among n held-out problems."""
    task = get_task(family)
    longest = max(len(tok.encode(task.solution(p) + p.answer)) for p in task.heldout(n))
    return int(1.5 * longest) + 16


__all__ = ["TASKS", "Addition", "Countdown", "LinearEquation", "Multiplication", "Problem", "Subtraction", "Task",
           "WORDINGS", "get_task", "parse_int", "problems_for", "token_budget"]
