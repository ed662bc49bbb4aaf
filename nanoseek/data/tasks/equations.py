"""Linear equations in one unknown, a*x + b = c with an integer solution, solved step by step.

    7x + 12 = 47: 7x = 47-12 = 35 | x = 35/7 = 5 -> 5
"""

from __future__ import annotations

from .base import Task
from .phrasing import Phrasing

FRAMES = [  # see phrasing.py; the first is the canonical wording. {eq} is the equation in a random style.
    "solve {eq}.", "solve for x: {eq}", "{eq}, what is x?", "find x if {eq}.", "what value of x makes {eq} true?",
    "{eq}", "if {a} times a number plus {b} equals {c}, what is the number?", "x = ? when {eq}", "what is x in {eq}?",
    "{pre}solve the equation {eq}.", "{eq}. find x.", "{tell} what x is if {eq}.", "i need x: {eq}",
    "equation: {eq}\nx = ?", "{pre}work out x from {eq}.", "for which x is {eq}?",
    "a number times {a}, plus {b}, gives {c}. what's the number?", "what x satisfies {eq}?", "{eq} -> x?",
    "help me solve {eq} for x.",
]
EQUATION_STYLES = ["{a}x + {b} = {c}", "{a}x+{b}={c}", "{a}*x + {b} = {c}", "{a}x + {b} = {c}", "{c} = {a}x + {b}"]


class LinearEquation(Task):
    name = "linear"
    phrasing = Phrasing("linear", FRAMES, {}, core=3)

    def __init__(self, max_coef: int = 9, max_x: int = 20, max_b: int = 50):
        self.max_coef, self.max_x, self.max_b = max_coef, max_x, max_b

    def draw(self, rng):
        a, x, b = rng.randint(2, self.max_coef), rng.randint(-self.max_x, self.max_x), rng.randint(1, self.max_b)
        return {"a": a, "b": b, "c": a * x + b, "x": x}

    def key(self, d):
        return f"{d['a']}x+{d['b']}={d['c']}"

    def values(self, d, rng):
        style = EQUATION_STYLES[0] if rng is None else rng.choice(EQUATION_STYLES)
        return {"eq": style.format(**d), "a": d["a"], "b": d["b"], "c": d["c"]}

    def answer(self, d):
        return str(d["x"])

    def solution(self, p):
        a, b, c, x = p.data["a"], p.data["b"], p.data["c"], p.data["x"]
        return f"{a}x + {b} = {c}: {a}x = {c}-{b} = {c - b} | x = {c - b}/{a} = {x} -> {x}"
