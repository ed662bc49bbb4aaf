"""Conversations that teach a model when to call a calculator and when not to, and how to answer
with thinking off.

Hard problems (a multiplication beyond two digits by two, an expression of three or more numbers),
with a calculator offered, are answered by calling it and reading its result back; without one the
model works them out as before. Easy problems are answered without a call even when a calculator is
offered. With thinking off the reply opens with an empty reasoning block (the tokenizer renders it)
and calls at once, or shows its working above the answer (Task.conversation). The tools' description
(the system message) is the server's, passed in by the caller, so training sees exactly what serving
sends. Held-out problems: seeds of the "test" split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

from .tasks import Task, get_task

OPERATORS = {"+": ["+", "plus"], "-": ["-", "minus"], "*": ["*", "×", "x", "times"]}
ASK = ["What is {e}?", "Compute {e}.", "Calculate {e}", "{e} = ?", "How much is {e}?", "what's {e}",
       "Please work out {e}.", "Can you tell me what {e} equals?", "Find the value of {e}.", "{e}",
       "I need the exact value of {e}, please.", "quick one: {e}?"]
SPLIT_SEED = {"train": 0, "test": 1 << 20}


def hard_problem(rng: random.Random) -> list[int | str]:
    """[n, op, n, op, n, ...]: a big multiplication, or three to four numbers with + - *. Each number's
    count of digits is drawn first, so the results run from one digit to ten: a model that only met
    results of typical lengths learned those lengths and wrote other results cut or padded (the shipped
    model copied 8-digit results right 0 times in 30, 3-digit ones 18 in 30)."""
    if rng.random() < 0.5:
        return [digits(rng, 3, 6), "*", digits(rng, 2, 4)]
    out = [digits(rng, 1, 6)]
    for _ in range(rng.randint(2, 3)):
        out += [rng.choice("+-*"), digits(rng, 1, 3)]
    return out


def digits(rng: random.Random, low: int, high: int) -> int:
    """A number of `low` to `high` digits, each count equally likely."""
    n = rng.randint(low, high)
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


def expression(terms: list, rng: random.Random | None = None) -> str:
    """The canonical text ('123 * 45 + 6'), or with rng a way a person might write it."""
    ops = (lambda op: op) if rng is None else (lambda op: rng.choice(OPERATORS[op]))
    return " ".join(str(t) if isinstance(t, int) else ops(t) for t in terms)


def value(terms: list) -> int:
    total, product, sign = 0, terms[0], 1
    for op, n in zip(terms[1::2], terms[2::2]):  # * before + and -
        if op == "*":
            product *= n
        else:
            total += sign * product
            product, sign = n, (1 if op == "+" else -1)
    return total + sign * product


class Calculator(Task):
    """The hard problems as a family RL and evaluation ask with the calculator offered: content held out
    by hash like every family's (`Task.split_of`), worded from ASK, verified as one integer. It has no
    worked solution: the model is meant to call the calculator (or may work it out)."""

    name = "calculator"

    def draw(self, rng: random.Random) -> dict:
        return {"terms": hard_problem(rng)}

    def key(self, data: dict) -> str:
        return expression(data["terms"])

    def ask(self, data: dict, rng: random.Random | None, templates: str = "train") -> tuple[str, str]:
        frame = ASK[0] if rng is None else rng.choice(ASK)
        return frame.format(e=expression(data["terms"], rng)), frame

    def answer(self, data: dict) -> str:
        return str(value(data["terms"]))


def rl_task(name: str) -> Task:
    """A task family by name, or the calculator family (asked with the calculator offered)."""
    return Calculator() if name == Calculator.name else get_task(name)


def calculator_call(terms: list, call_id: str) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression(terms)})}}


def tool_conversations(tools_prompt: str, rng: random.Random, split: str = "train") -> list[list[dict]]:
    """One hard problem with the calculator offered: the turn that calls it (reasoning kept: it is
    the last message) and the whole exchange up to the answer."""
    problem = Calculator().sample(rng, split)
    terms = problem.data["terms"]
    system = {"role": "system", "content": tools_prompt}
    user = {"role": "user", "content": problem.question}
    call = calculator_call(terms, f"call_{rng.randrange(1 << 30):x}")
    reasoning = (f"{expression(terms)} needs exact arithmetic on several or large numbers: "
                 "I'll use the calculator.")
    first = {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": reasoning}
    if rng.random() < 0.3:  # thinking off: the call at once
        first = {**first, "reasoning_content": None, "thinking": False}
    rest = [{"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": str(value(terms))},
            {"role": "assistant", "content": str(value(terms))}]
    return [[system, user, first], [system, user, *rest]]


def tool_use_conversations(n: int, tools_prompt: str, seed: int = 0, split: str = "train",
                           no_thinking: float = 0.3) -> Iterator[list[dict]]:
    """n conversations: half calculator calls on hard problems, half task problems with the
    calculator offered and not needed (a share of all of them with thinking off)."""
    rng = random.Random(seed + SPLIT_SEED[split])
    tasks = [get_task(name) for name in ("add", "sub", "mul")]
    made = 0
    while made < n:
        if rng.random() < 0.5:
            for conv in tool_conversations(tools_prompt, rng, split)[: n - made]:  # a pair; the last may not fit
                yield conv
                made += 1
            continue
        task = rng.choice(tasks)
        problem = task.sample(rng, split)
        yield [{"role": "system", "content": tools_prompt},
               *task.conversation(problem, thinking=rng.random() >= no_thinking)]
        made += 1
