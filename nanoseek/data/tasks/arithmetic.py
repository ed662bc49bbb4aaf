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
from .phrasing import Phrasing, covers, held_out

# frames (see phrasing.py). Most are shared by the three families, their operation a slot ({op}: `+`,
# `plus`, `-`, `minus`, `times`, ...; {noun}: sum, difference, product; {rise}: rose by, fell by), so a
# sentence pattern never tells the operation: only its words do. Written per family, the patterns were
# the cue: the model shipped in session 39 read `give me the sum of` (held out) as a subtraction and
# `if i have 94 and spend 552` as an addition, like the trained patterns nearest to them. A shared
# pattern held out is held out in every family. The first is the canonical wording (`what is {a} + {b}?`);
# the first CORE_FRAMES are always trained. Commutative families name the operands in the order the
# worked solution restates them ({a} before {b}).
CORE_FRAMES = ["what is {a} {op} {b}?", "{what} {a} {op} {b}?", "{pre}{calc} {a} {op} {b}.", "{a} {op} {b}",
               "{a} {op} {b} = ?", "{a}{sym}{b}"]
INFIX_FRAMES = CORE_FRAMES + [
    "{a}{sym}{b}=", "{tell} what {a} {op} {b} is.", "how much is {a} {op} {b}?", "{a} {op} {b} equals what?",
    "what does {a} {op} {b} equal?", "{a} {op} {b} is how much?", "{a} {op} {b}, what's the answer?",
    "what is the result of {a} {op} {b}?", "what's the result of {a} {op} {b}?", "quick maths: {a} {op} {b}",
    "{a} {op} {b} = ?? i keep getting different answers", "{a} {op} {b} = ?? not sure about this one",
    "{a} {op} {b} = ?? my calculator is broken", "{pre}find {a} {op} {b}.", "{a} {op} {b} is what?",
    "what is {a} {op} {b} exactly?", "{pre}solve {a} {op} {b}", "{a} {op} {b} makes what?",
    "what number is {a} {op} {b}?", "{a} {op} {b}? {tell}",
]
NOUN_FRAMES = [
    "what is the {noun} of {a} and {b}?", "{noun} of {a} and {b}?", "{pre}give me the {noun} of {a} and {b}.",
    "{pre}work out the {noun} of {a} and {b}.", "{pre}find the {noun} of {a} and {b}.",
    "{tell} the {noun} of {a} and {b}.", "what's the {noun} of {a} and {b}?", "{a} and {b}: what is their {noun}?",
]
# addition and subtraction: a quantity that goes up or down
CHANGE_FRAMES = [
    "the temperature was {a} degrees and it {rise} {b} degrees. what is it now?",
    "it was {a} degrees, then it {rise} {b} degrees. how warm is it now?", "{a} {rise} {b}. what is the new value?",
    "a price of {a} dollars {rise} {b} dollars. what is the price now?",
    "i had {a} dollars and {earned} {b}. how much do i have now?",
    "my balance was {a} dollars and i {earned} {b}. what is my balance now?",
    "if i have {a} and {get} {b}, how much do i have then?", "i have {a} {things} and {get} {b}. how many do i have now?",
    "{change} {a} by {b}. what is the result?", "what is {a} {changed} {b}?", "start at {a} and count {up} {b}. where do you end up?",
]
ADD_FRAMES = INFIX_FRAMES + NOUN_FRAMES + CHANGE_FRAMES + [
    "{pre}add {a} and {b}.", "{pre}add {a} to {b}.", "what do you get when you add {a} and {b}?",
    "there are {a} {things} in one box and {b} in another. how many {things} are there altogether?",
    "a shop sold {a} {things} on monday and {b} on tuesday. how many did it sell in total?",
    "{pre}add together {a} and {b}.", "what's {a} and {b} added together?", "if i add {a} and {b}, what do i get?",
    "what's the total when you combine {a} and {b}?", "{a} and {b} added up is what?",
]
SUB_FRAMES = INFIX_FRAMES + NOUN_FRAMES + CHANGE_FRAMES + [
    "{pre}subtract {b} from {a}.", "what is the difference {a} - {b}?", "{pre}take {b} away from {a}.",
    "what do you get if you subtract {b} from {a}?", "{a} take away {b}", "what is {b} less than {a}?",
    "if i have {a} and spend {b}, what is left?", "how much is left if you take {b} from {a}?",
    "a shop had {a} {things} and sold {b}. how many are left?", "i have {a} {things} and give away {b}. how many are left?",
]
MUL_FRAMES = INFIX_FRAMES + NOUN_FRAMES + [
    "{pre}multiply {a} by {b}.", "{pre}multiply {a} and {b} together.", "if you multiply {a} by {b}, what do you get?",
    "{a} boxes with {b} {things} each: how many {things}?", "there are {a} rows of {b} chairs. how many chairs in total?",
    "{a} packs hold {b} {things} each. how many {things} is that?", "{a} lots of {b}?", "{a} groups of {b} make how many?",
    "each of {a} students brings {b} {things}. how many {things} altogether?",
    "what do you get when you multiply {a} and {b}?", "{a} and {b} multiplied together is what?",
    "there are {a} {things} in each of {b} boxes. how many {things} are there altogether?",
]
# a slot's first word is the canonical one
ARITHMETIC_SLOTS = {
    "add": {"op": ["+", "plus"], "sym": ["+"], "noun": ["sum", "total"], "rise": ["rose by", "went up by", "rose"],
            "earned": ["earned", "got", "was given"], "get": ["get", "earn", "find"], "change": ["increase", "raise"],
            "changed": ["increased by", "plus"], "up": ["up"]},
    "sub": {"op": ["-", "minus"], "sym": ["-"], "noun": ["difference"], "rise": ["fell by", "went down by", "fell"],
            "earned": ["spent", "lost", "paid"], "get": ["spend", "lose", "give away"],
            "change": ["decrease", "reduce", "lower"], "changed": ["reduced by", "minus"], "up": ["down"]},
    "mul": {"op": ["*", "x", "×", "times", "multiplied by"], "sym": ["*", "x", "×"], "noun": ["product"]},
}
FAMILY_FRAMES = {"add": ADD_FRAMES, "sub": SUB_FRAMES, "mul": MUL_FRAMES}
# held out once for all three families: a pattern is trained in every family or in none, and every word
# of a held-out pattern is trained in each family's other patterns
ARITHMETIC_HELD_OUT = held_out(
    list(dict.fromkeys(ADD_FRAMES + SUB_FRAMES + MUL_FRAMES)), "arithmetic", keep=tuple(CORE_FRAMES),
    covered=lambda held: all(covers(frames, ARITHMETIC_SLOTS[name], held & set(frames))
                             for name, frames in FAMILY_FRAMES.items()))


def prose_frames(frames: list[str]) -> frozenset[str]:
    """Frames where numbers in words read naturally: no operator symbol or '=' beside a value."""
    return frozenset(f for f in frames if not re.search(r"\}[+\-*x=]|[+\-*×x=]\{| [+\-*×=] |\{sym\}", f))


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
    phrasing = Phrasing("add", ADD_FRAMES, ARITHMETIC_SLOTS["add"], prose_frames(ADD_FRAMES),
                         held=ARITHMETIC_HELD_OUT & set(ADD_FRAMES))

    def answer(self, d):
        return str(d["a"] + d["b"])

    def solution(self, p):
        a, b = p.data["a"], p.data["b"]
        return f"{a}+{b}: " + aligned(a, b, "+") + add_trace(a, b)[0]


class Subtraction(TwoNumbers):
    name = "sub"
    phrasing = Phrasing("sub", SUB_FRAMES, ARITHMETIC_SLOTS["sub"], prose_frames(SUB_FRAMES),
                         held=ARITHMETIC_HELD_OUT & set(SUB_FRAMES))

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
    phrasing = Phrasing("mul", MUL_FRAMES, ARITHMETIC_SLOTS["mul"], prose_frames(MUL_FRAMES),
                         held=ARITHMETIC_HELD_OUT & set(MUL_FRAMES))

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
