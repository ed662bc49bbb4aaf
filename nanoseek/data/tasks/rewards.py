"""Rule-based rewards for R1-style RL, next to the verifiers they use.

A completion is what the model wrote after a prompt that opened `<think>\\n` (R1 style), so a
well-formed one is `reasoning </think> answer`: exactly one closing tag, no other think tag,
reasoning and answer both non-empty. The answer is taken strictly from after `</think>`; an
answer that only appears inside the reasoning earns nothing. Known reward hacks, each tested:
several think blocks, the answer only inside the thinking, several answers, empty thinking.
"""

from __future__ import annotations

import functools
import re

from ...tokenizer import END_THINK, THINK
from .base import Problem, Task


def split_completion(completion: str) -> tuple[str, str] | None:
    """-> (reasoning, answer) for a well-formed completion, else None."""
    if completion.count(END_THINK) != 1 or THINK in completion:
        return None
    reasoning, answer = completion.split(END_THINK)
    reasoning, answer = reasoning.strip(), answer.strip()
    if not reasoning or not answer:
        return None
    return reasoning, answer


THINKING_OFF = "(thinking off)"  # stands for the reasoning of a thinking-off reply, which the scorer requires


def without_thinking(reply: str) -> str:
    """A thinking-off reply (the prompt closed the reasoning block) in the `reasoning </think> answer` shape the
    rewards read: its last line is the answer, the working shown above it (Task.conversation) stands as the
    reasoning. A reply that writes a think tag itself stays malformed."""
    work, _, answer = reply.strip().rpartition("\n")
    return f"{THINKING_OFF} {work}\n{END_THINK}\n\n{answer}"


def format_reward(completion: str) -> float:
    """1 for exactly one well-formed reasoning block followed by an answer, else 0."""
    return 1.0 if split_completion(completion) is not None else 0.0


_MATH_TAIL = re.compile(r"^(?:the answer is|answer:|=)\s*", re.IGNORECASE)


def final_answer(completion: str) -> str | None:
    """The answer text after </think> (None if malformed). An answer written twice or more
    (e.g. '12 13', or two lines) is ambiguous and returned as is, so the verifier rejects it."""
    parts = split_completion(completion)
    if parts is None:
        return None
    answer = _MATH_TAIL.sub("", parts[1]).strip().rstrip(".")
    return answer


def accuracy_reward(task: Task, problem: Problem, completion: str, answer: str | None = None) -> float:
    """1 if the final answer (after </think>) verifies, else 0. Numeric answers are also checked
    with math-verify when it is installed (it accepts forms like 1,017 or \\boxed{1017}).
    `answer`: the answer given in a later turn instead (after a tool's result)."""
    answer = final_answer(completion) if answer is None else _MATH_TAIL.sub("", answer.strip()).strip().rstrip(".")
    if answer is None:
        return 0.0
    if task.verify(problem, answer):
        return 1.0
    return 1.0 if _math_verify(problem.answer, answer) else 0.0


@functools.lru_cache(maxsize=4096)  # ~2 ms a call; GRPO asks twice per completion (its reward, the logged accuracy)
def _math_verify(gold: str, answer: str) -> bool:
    if not re.fullmatch(r"-?\d+", gold) or len(answer) > 60 or len(re.findall(r"\d[\d,]*", answer)) != 1:
        return False  # one number only: a list of guesses or a repeated answer does not count
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        return bool(verify(parse(gold), parse(answer)))
    except Exception:  # math-verify raises on unparsable text; that is a wrong answer, not an error
        return False


def reward(task: Task, problem: Problem, completion: str, format_weight: float = 0.1, answer: str | None = None) -> float:
    """accuracy + format_weight * format (the R1 recipe's rule-based reward); `answer` as in accuracy_reward."""
    return accuracy_reward(task, problem, completion, answer) + format_weight * format_reward(completion)
