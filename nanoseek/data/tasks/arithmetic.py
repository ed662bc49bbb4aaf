"""Multi-digit addition, subtraction and multiplication with digit-by-digit worked solutions.

Traces (least significant digit first, carries and borrows written out, the result read back):
    876+141: 6+1+0=7 c0 -> 7 | 7+4+0=11 c1 -> 17 | 8+1+1=10 c1 -> 017 -> 1017
    48+934: 048+934 | 8+4+0=12 c1 -> 2 | 4+3+1=8 c0 -> 82 | 0+9+0=9 c0 -> 982
    52-38: 5 vs 3 > so 52>38 | 2-8-0 -> 12-8-0=4 b1 | 5-3-1=1 b0 -> 14
    37-388: 2 digits vs 3 so 37<388 | -(388-37) | 8-7-0=1 b0 | 8-3-0=5 b0 | 3-0-0=3 b0 -> 351 -> -351
    463-461: 4 vs 4 =, 6 vs 6 =, 3 vs 1 > so 463>461 | 3-1-0=2 b0 | 6-6-0=0 b0 | 4-4-0=0 b0 -> 002 -> 2
Subtraction first decides which operand is larger (lengths, then digits from the top), so the
sign is settled by a written comparison, and a result with leading zeros is read back twice. Each
digit pair is written before its relation, so the relation follows from the two digits just written
(written between them, `6>7`, it had to be looked up in the question: the misses of two runs). Addition
restates operands of unequal lengths zero-padded to the same length, so every column step reads its
digits at the same place from the right in both numbers (with only a note of the lengths, `2 digits
vs 3`, fresh runs kept taking the shorter first operand's tens digit from the wrong column).
    22*89: 22*9: 2*9+0=18 c1 | 2*9+1=19 c1 -> 198 ; 22*8: ... -> 176 -> 1760 ; 198+1760: ... -> 1958
Additions write the result so far after each column (copying the last partial, one digit in front).
"""

from __future__ import annotations

import random
import re

from .base import Task
from .phrasing import Phrasing

# frames (see phrasing.py); the first is the canonical wording. Commutative families name the
# operands in the order the worked solution restates them ({a} before {b}).
ADD_FRAMES = [
    "what is {a} + {b}?", "{what} {a} {plus} {b}?", "{pre}{calc} {a} {plus} {b}.", "{a} {plus} {b}", "{a} {plus} {b} = ?",
    "{a}+{b}", "{a}+{b}=", "{pre}add {a} and {b}.", "{pre}add {a} to {b}.", "what is the sum of {a} and {b}?",
    "{tell} what {a} {plus} {b} is.", "how much is {a} {plus} {b}?", "what do you get when you add {a} and {b}?",
    "{a} {plus} {b} equals what?", "{pre}find the total of {a} and {b}.", "sum of {a} and {b}?",
    "what does {a} {plus} {b} equal?", "{a} {plus} {b} is how much?",
    "i have {a} {things} and get {b} more. how many {things} do i have now?",
    "there are {a} {things} in one box and {b} in another. how many {things} are there altogether?",
    "a shop sold {a} {things} on monday and {b} on tuesday. how many did it sell in total?",
    "{pre}add together {a} and {b}.", "what's {a} and {b} added together?", "{a} {plus} {b}, what's the answer?",
    "if i add {a} and {b}, what do i get?", "what's the total when you combine {a} and {b}?",
    "{a} {plus} {b} = ?? i keep getting different answers", "increase {a} by {b}. what is the result?",
    "{pre}give me the sum of {a} and {b}.", "what is the result of {a} {plus} {b}?", "{a} and {b} added up is what?",
    "quick maths: {a} {plus} {b}", "the temperature was {a} degrees and it rose by {b} degrees. what is it now?",
    "i had {a} dollars and earned {b} more. how much do i have now?", "{a} rose by {b}. what is the new value?",
]
SUB_FRAMES = [
    "what is {a} - {b}?", "{what} {a} {minus} {b}?", "{pre}{calc} {a} {minus} {b}.", "{a} {minus} {b}",
    "{a} {minus} {b} = ?", "{a}-{b}", "{a}-{b}=", "{pre}subtract {b} from {a}.", "what is the difference {a} - {b}?",
    "{tell} what {a} {minus} {b} is.", "how much is {a} {minus} {b}?", "{pre}take {b} away from {a}.",
    "what do you get if you subtract {b} from {a}?", "{a} {minus} {b} equals what?", "what does {a} {minus} {b} equal?",
    "{a} take away {b}", "what is {b} less than {a}?", "if i have {a} and spend {b}, what is left?",
    "my balance was {a} dollars and i spent {b}. what is my balance now?",
    "the temperature was {a} degrees and it fell by {b} degrees. what is it now?",
    "{a} {minus} {b}, what's the answer?", "what's the result of {a} {minus} {b}?", "{pre}find {a} {minus} {b}.",
    "decrease {a} by {b}. what do you get?", "start at {a} and count down {b}. where do you end up?",
    "{a} minus {b} is what?", "how much is left if you take {b} from {a}?", "quick maths: {a} {minus} {b}",
    "what is {a} reduced by {b}?", "{a} {minus} {b} = ?? not sure about this one",
    "i had {a} dollars and spent {b}. how much do i have left?", "it was {a} degrees, then it fell {b} degrees. "
    "how warm is it now?", "{a} fell by {b}. what is the new value?", "i have {a} {things} and give away {b}. "
    "how many are left?",
]
MUL_FRAMES = [
    "what is {a} * {b}?", "{what} {a} {times} {b}?", "{pre}{calc} {a} {times} {b}.", "{a} {times} {b}",
    "{a} {times} {b} = ?", "{a}*{b}", "{a}x{b}", "{pre}multiply {a} by {b}.", "what is the product of {a} and {b}?",
    "{tell} what {a} {times} {b} is.", "how much is {a} {times} {b}?", "{a} {times} {b} equals what?",
    "what does {a} {times} {b} equal?", "{a} boxes with {b} {things} each: how many {things}?",
    "there are {a} rows of {b} chairs. how many chairs in total?",
    "{a} packs hold {b} {things} each. how many {things} is that?", "{pre}multiply {a} and {b} together.",
    "what's {a} multiplied by {b}?", "{a} {times} {b}, what's the answer?", "what's the result of {a} {times} {b}?",
    "{pre}find the product {a} × {b}.", "{a} lots of {b}?", "{a} groups of {b} make how many?",
    "if you multiply {a} by {b}, what do you get?", "quick maths: {a} {times} {b}",
    "{a} {times} {b} = ?? my calculator is broken", "what is {a} times {b} exactly?",
    "each of {a} students brings {b} {things}. how many {things} altogether?", "{a} multiplied by {b} is how much?",
    "{pre}work out the product of {a} and {b}.",
]
OPERATOR_WORDS = {"plus": ["+", "plus"], "minus": ["-", "minus"], "times": ["*", "x", "×", "times", "multiplied by"]}


def prose_frames(frames: list[str]) -> frozenset[str]:
    """Frames where numbers in words read naturally: no operator symbol or '=' beside a value."""
    return frozenset(f for f in frames if not re.search(r"\}[+\-*x=]|[+\-*×x=]\{| [+\-*×=] ", f))


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def add_trace(a: int, b: int) -> tuple[str, int]:
    """Column steps, each followed by the result so far ('9+4+0=13 c1 -> 32'), so the answer is built
    by copying the previous partial and putting one digit in front of it; a final carry is put in front
    last ('-> 1332'). Read back at the end instead, the units digit was looked up three steps back and a
    run got it wrong in a quarter of its 4-digit sums (891+441 -> 1336)."""
    da, db = _digits(a), _digits(b)
    steps, carry, partial = [], 0, ""
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        partial = f"{s % 10}{partial}"
        steps.append(f"{x}+{y}+{carry}={s} c{s // 10} -> {partial}")
        carry = s // 10
    result = int(f"{carry or ''}{partial}")
    return " | ".join(steps) + (f" -> {result}" if carry else ""), result


def compare_trace(a: int, b: int) -> str:
    """'4 vs 4 =, 6 vs 6 =, 3 vs 1 > so 463>461': lengths first, then digits from the most significant."""
    sa, sb = str(a), str(b)
    rel = "<" if a < b else (">" if a > b else "=")
    if len(sa) != len(sb):
        return f"{_lengths(a, b)} so {a}{rel}{b}"
    steps = []
    for x, y in zip(sa, sb):
        steps.append(f"{x} vs {y} {'<' if x < y else ('>' if x > y else '=')}")
        if x != y:
            break
    return ", ".join(steps) + f" so {a}{rel}{b}"


def aligned(a: int, b: int, op: str) -> str:
    """'048+934 | ' when the operands' lengths differ (both zero-padded to the longer one), '' otherwise."""
    width = max(len(str(a)), len(str(b)))
    return "" if len(str(a)) == len(str(b)) else f"{a:0{width}d}{op}{b:0{width}d} | "


def _lengths(a: int, b: int) -> str:
    return f"{len(str(a))} digits vs {len(str(b))}"


def read_back(digits: list[int]) -> tuple[str, int]:
    """Least-significant-first digits read in normal order: '-> 081 -> 81' when zeros lead."""
    written = "".join(map(str, reversed(digits)))
    value = int(written)
    return (f" -> {written}" + (f" -> {value}" if written != str(value) else "")), value


def sub_trace(a: int, b: int) -> tuple[list[str], str, int]:
    """a >= b >= 0, digit by digit with borrows: (steps, read-back text, result)."""
    da, db = _digits(a), _digits(b)
    steps, borrow, out = [], 0, []
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        d = x - y - borrow
        if d < 0:
            steps.append(f"{x}-{y}-{borrow} -> 1{x}-{y}-{borrow}={d + 10} b1")
            out.append(d + 10)
            borrow = 1
        else:
            steps.append(f"{x}-{y}-{borrow}={d} b0")
            out.append(d)
            borrow = 0
    text, value = read_back(out)
    return steps, text, value


def mul_digit_trace(a: int, digit: int) -> tuple[list[str], int]:
    steps, carry, out = [], 0, []
    for x in _digits(a):
        p = x * digit + carry
        steps.append(f"{x}*{digit}+{carry}={p} c{p // 10}")
        out.append(p % 10)
        carry = p // 10
    if carry:
        out.append(carry)
    return steps, int("".join(map(str, reversed(out))))


BOTH_SMALL = 1 / 3  # of the problems drawn with a small operand: both operands single digits


class TwoNumbers(Task):
    """Two operands of given digit counts; subclasses set the phrasing and write the solution."""

    commutative = False

    def __init__(self, min_digits: int = 2, max_digits: int = 3, small_share: float = 0.0):
        self.lo, self.hi, self.small_share = min_digits, max_digits, small_share

    def draw(self, rng):
        d = {"a": _number(rng, self.lo, self.hi), "b": _number(rng, self.lo, self.hi)}
        if rng.random() < self.small_share:  # one operand a single digit ("what's 7 plus 18?"), a third of
            # the time both ("what's 7 plus 8?", which a run that never saw it added as 7+0, 0+8, 0+9 -> 987)
            for name in ("ab" if rng.random() < BOTH_SMALL else rng.choice("ab")):
                d[name] = rng.randint(1, 9)
        return d

    def key(self, d):
        a, b = sorted((d["a"], d["b"])) if self.commutative else (d["a"], d["b"])
        return f"{self.name}:{a},{b}"

    def values(self, d, rng):
        return {"a": d["a"], "b": d["b"]}


class Addition(TwoNumbers):
    name, commutative = "add", True
    phrasing = Phrasing("add", ADD_FRAMES, {"plus": OPERATOR_WORDS["plus"]}, prose_frames(ADD_FRAMES))

    def answer(self, d):
        return str(d["a"] + d["b"])

    def solution(self, p):
        a, b = p.data["a"], p.data["b"]
        return f"{a}+{b}: " + aligned(a, b, "+") + add_trace(a, b)[0]


class Subtraction(TwoNumbers):
    name = "sub"
    phrasing = Phrasing("sub", SUB_FRAMES, {"minus": OPERATOR_WORDS["minus"]}, prose_frames(SUB_FRAMES))

    def answer(self, d):
        return str(d["a"] - d["b"])

    def solution(self, p):
        a, b = p.data["a"], p.data["b"]
        head = f"{a}-{b}: {compare_trace(a, b)} | " + (f"-({b}-{a}) | " if a < b else "")
        steps, text, result = sub_trace(max(a, b), min(a, b))
        return head + " | ".join(steps) + text + (f" -> -{result}" if a < b else "")


class Multiplication(TwoNumbers):
    """2-digit by 2-digit by default: one partial product per digit of b, then their column sum."""

    name, commutative = "mul", True
    phrasing = Phrasing("mul", MUL_FRAMES, {"times": OPERATOR_WORDS["times"]}, prose_frames(MUL_FRAMES))

    def __init__(self, min_digits: int = 2, max_digits: int = 2, small_share: float = 0.0):
        super().__init__(min_digits, max_digits, small_share)

    def answer(self, d):
        return str(d["a"] * d["b"])

    def solution(self, p):
        a, b = p.data["a"], p.data["b"]
        parts, lines = [], [f"{a}*{b}:"]
        for place, digit in enumerate(_digits(b)):
            steps, partial = mul_digit_trace(a, digit)
            shifted = partial * 10**place
            lines.append(f"{a}*{digit}: " + " | ".join(steps) + f" -> {partial}"
                         + (f" -> {shifted}" if place else ""))
            parts.append(shifted)
        total = parts[0]
        for nxt in parts[1:]:
            steps, s = add_trace(total, nxt)
            lines.append(f"{total}+{nxt}: " + steps)
            total = s
        return "\n".join(lines)


def _number(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    digits = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)
