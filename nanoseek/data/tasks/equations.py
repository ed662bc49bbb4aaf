"""Linear equations in one unknown, a*x + b = c with an integer solution, solved step by step.

    7x + 12 = 47: 7x = 47-12 = 35 | x = 35/7 = 5 -> 5
"""

from __future__ import annotations

from .base import Task, surface

TEMPLATES = [
    "Solve {a}x + {b} = {c}.", "Solve for x: {a}x + {b} = {c}", "{a}x + {b} = {c}, what is x?",
    "Find x if {a}x + {b} = {c}.", "What value of x makes {a}x + {b} = {c} true?", "{a}*x+{b}={c}",
    "If {a} times a number plus {b} equals {c}, what is the number?", "x = ? when {a}x + {b} = {c}",
    "solve {a}x+{b}={c}", "What is x in {a}x + {b} = {c}?",
]


class LinearEquation(Task):
    name = "linear"

    def __init__(self, max_coef: int = 9, max_x: int = 20, max_b: int = 50):
        self.max_coef, self.max_x, self.max_b = max_coef, max_x, max_b

    def draw(self, rng):
        a, x, b = rng.randint(2, self.max_coef), rng.randint(-self.max_x, self.max_x), rng.randint(1, self.max_b)
        return {"a": a, "b": b, "c": a * x + b, "x": x}

    def key(self, d):
        return f"{d['a']}x+{d['b']}={d['c']}"

    def phrase(self, d, rng):
        return surface((TEMPLATES[0] if rng is None else rng.choice(TEMPLATES)).format(**d), rng)

    def answer(self, d):
        return str(d["x"])

    def solution(self, p):
        a, b, c, x = p.data["a"], p.data["b"], p.data["c"], p.data["x"]
        return f"{a}x + {b} = {c}: {a}x = {c}-{b} = {c - b} | x = {c - b}/{a} = {x} -> {x}"
