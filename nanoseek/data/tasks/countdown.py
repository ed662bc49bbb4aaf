"""Countdown: reach a target using each given number exactly once with + - * /.

The worked solution is a goal-directed search. For each number c set aside, it lists what the
other two must make so that one more step with c hits the target (t-c, t+c, c-t, t/c), then
tries the pair's results against that list, stopping at the first hit:
    3 12 7 -> 33:
    keep 7 (3 12): need 33-7=26 33+7=40 | 3+12=15 12-3=9 3*12=36 no
    keep 12 (3 7): need 33-12=21 33+12=45 | 3+7=10 7-3=4 3*7=21 ok
    (3*7)+12
Every step writes its operands before its result: trained on needs written result first
(`need 26 (33-7)`), the shipped model got a need wrong in 71 of 100 held-out puzzles' traces, while
a pair's result, written operands first, was the first mistake in 1. The pair is written out
before it is used, and a product of two numbers above 10 is written
`big` (it exceeds every value the search can need), so the trace never asks for a 2-digit by
2-digit product.
The answer is an expression; `verify` parses it safely, checks it uses exactly the given
numbers, and that it evaluates to the target (division must be exact).
"""

from __future__ import annotations

import ast
import itertools
import operator
from fractions import Fraction

from .base import Task
from .phrasing import Phrasing

FRAMES = [  # see phrasing.py; the first is the canonical wording
    "use {nums} to make {t}.", "how can you {make} {t} using {nums}?", "{make} {t} from {nums}.",
    "using {nums} exactly once each, {make} {t}.", "countdown: numbers {nums}, target {t}.",
    "can you make {t} out of {nums}?", "combine {nums} with {ops} to {make} {t}.", "reach {t} with {nums}.",
    "target {t}. numbers: {nums}. use each once.", "find an expression equal to {t} using {nums}.",
    "with the numbers {nums}, how do you {make} {t}?", "{make} {t} from {nums} using {ops}.",
    "numbers: {nums}\ntarget: {t}", "i have the numbers {nums}. how do i {make} {t}?",
    "write an expression that equals {t} using {nums}, each exactly once.",
    "is it possible to make {t} with {nums}? show me how.", "using {ops}, turn {nums} into {t}.", "{nums} -> {t}",
    "what expression with {nums} gives {t}?", "puzzle: {make} {t} using {nums}.", "using each of {nums} once, make {t}.",
    "i want to {make} {t}. i can use {nums}, once each.", "make the number {t} using {nums} and {ops}.",
    "how do i {make} {t} out of {nums}?", "can {nums} make {t}?", "arrange {nums} with {ops} to equal {t}.",
    "you have {nums}. {make} {t}.", "numbers game: {nums}, target {t}", "combine the numbers {nums} to total {t}.",
    "build {t} from {nums}.", "from {nums}, produce {t} using {ops}, each number once.",
    "the target is {t} and the numbers are {nums}. go!",
]
SLOTS = {"make": ["make", "get", "reach", "hit", "end up with", "get to"],
         "ops": ["+ - * /", "+, -, * and /", "+ - *", "addition, subtraction and multiplication", "basic arithmetic",
                 "the usual operations", "plus, minus and times"]}
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


BIG = 11  # both factors at least this: the product (>= 121) is past every target +- number


def pair_results(a: int, b: int, division: bool) -> list[tuple[str, int]]:
    """What two numbers make in one step (non-negative integers only)."""
    lo, hi = min(a, b), max(a, b)
    out = [(f"{a}+{b}", a + b), (f"{hi}-{lo}", hi - lo), (f"{a}*{b}", a * b)]
    if division and lo and hi % lo == 0:
        out.append((f"{hi}/{lo}", hi // lo))
    return out


def needs(target: int, c: int, division: bool) -> list[tuple[str, str, int]]:
    """What the other two must make so that one step with c reaches target: (how, template, value)."""
    out = [(f"{target}-{c}", "({x})+%d" % c, target - c), (f"{target}+{c}", "({x})-%d" % c, target + c),
           (f"{c}-{target}", "%d-({x})" % c, c - target)]
    if c and target % c == 0:
        out.append((f"{target}/{c}", "({x})*%d" % c, target // c))
    if division:
        out.append((f"{target}*{c}", "({x})/%d" % c, target * c))
    return [(how, tmpl, v) for how, tmpl, v in out if v >= 0]


def solve(nums: list[int], target: int, division: bool = True) -> tuple[list[str], str | None]:
    """Trace lines and the first expression found (None when unreachable this way)."""
    lines = []
    for i in reversed(range(len(nums))):
        c = nums[i]
        a, b = [n for j, n in enumerate(nums) if j != i]
        want = needs(target, c, division)
        want_by_value = {v: tmpl for _, tmpl, v in want}
        head = f"keep {c} ({a} {b}): need " + " ".join(f"{how}={v2}" for how, _, v2 in want) + " |"
        big_product = min(a, b) >= BIG and a * b > max((v2 for *_, v2 in want), default=0)
        tries = []
        for expr, v in pair_results(a, b, division):
            if big_product and "*" in expr:
                tries.append(f"{expr} big")
                continue
            tries.append(f"{expr}={v}")
            if v in want_by_value:
                lines.append(" ".join([head, *tries, "ok"]))
                return lines, want_by_value[v].format(x=expr)
        lines.append(" ".join([head, *tries, "no"]))
    return lines, None


def evaluate(expr: str, allowed: list[int]) -> Fraction | None:
    """Value of an arithmetic expression using exactly the numbers `allowed`; None if invalid."""
    try:
        tree = ast.parse(expr.replace("×", "*").replace("x", "*").replace("÷", "/"), mode="eval")
    except (SyntaxError, ValueError):
        return None
    used: list[int] = []

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return OPS[type(node.op)](left, right)
        raise ValueError("not an arithmetic expression")

    try:
        value = ev(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return value if sorted(used) == sorted(allowed) else None


class Countdown(Task):
    name = "countdown"
    phrasing = Phrasing("countdown", FRAMES, SLOTS, frozenset(f for f in FRAMES if "->" not in f), core=4)

    def __init__(self, n_numbers: int = 3, max_number: int = 20, max_target: int = 100, division: bool = False):
        if n_numbers != 3:
            raise ValueError("the worked-solution search is written for 3 numbers")
        self.n, self.max_number, self.max_target, self.division = n_numbers, max_number, max_target, division

    def draw(self, rng):
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.n)]
            reachable = set()
            for x, y, z in itertools.permutations(nums):
                for _, v in pair_results(x, y, self.division):
                    reachable |= {v for _, v in pair_results(v, z, self.division)}
            targets = [t for t in sorted(reachable) if 1 <= t <= self.max_target and t not in nums
                       and solve(nums, t, self.division)[1] is not None]
            if targets:
                return {"nums": nums, "target": rng.choice(targets)}

    def key(self, d):
        return f"{sorted(d['nums'])}->{d['target']}"

    def values(self, d, rng):
        return {"nums": d["nums"], "t": d["target"]}

    def answer(self, d):
        _, expr = solve(d["nums"], d["target"], self.division)
        return expr

    def solution(self, p):
        nums, t = p.data["nums"], p.data["target"]
        lines, _ = solve(nums, t, self.division)
        return f"{' '.join(map(str, nums))} -> {t}:\n" + "\n".join(lines)

    def verify(self, p, answer):
        text = answer.strip().rstrip(".").split("=")[0].strip()
        value = evaluate(text, p.data["nums"])
        return value is not None and value == p.data["target"]
