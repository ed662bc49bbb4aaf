"""What every task family provides: problems phrased many ways, a held-out split, worked
solutions, and a verifier.

A family draws a problem's *content* (operands, target) and a *phrasing* separately. The
held-out split is decided by a hash of the content key alone (`key`), so a test problem is
never trained on in any wording: `sample(rng, split="train")` rejects test keys and
`sample(rng, split="test")` rejects train keys. The worked solution always opens by restating
the problem in one canonical form, so the many wordings all lead into the same reasoning.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

TEST_FRACTION = 0.05  # share of problem contents held out for evaluation


@dataclass(frozen=True)
class Problem:
    family: str
    question: str  # as a user would type it
    answer: str  # the canonical final answer
    data: dict = field(default_factory=dict, compare=False)  # operands etc., for the solution writer


class Task:
    """Subclasses set `name` and implement draw(), key(), phrase(), solution(), verify()."""

    name = "task"

    def draw(self, rng: random.Random) -> dict:
        """Random problem content."""
        raise NotImplementedError

    def key(self, data: dict) -> str:
        """Canonical identity of the content (e.g. the unordered operands of a sum)."""
        raise NotImplementedError

    def phrase(self, data: dict, rng: random.Random | None) -> str:
        """The question in a random wording (the canonical one when rng is None)."""
        raise NotImplementedError

    def answer(self, data: dict) -> str:
        raise NotImplementedError

    def solution(self, problem: Problem) -> str:
        """The worked reasoning that leads to the answer (goes inside <think>)."""
        raise NotImplementedError

    def verify(self, problem: Problem, answer: str) -> bool:
        """Is `answer` (the text after the reasoning) a correct final answer?"""
        got = parse_int(answer)
        return got is not None and str(got) == problem.answer

    def conversation(self, problem: Problem) -> list[dict]:
        """The problem as a chat: the user's question, the worked reasoning, the final answer."""
        return [{"role": "user", "content": problem.question},
                {"role": "assistant", "reasoning_content": self.solution(problem), "content": problem.answer}]

    # ---- shared machinery ----
    def split_of(self, data: dict) -> str:
        digest = hashlib.sha256(f"{self.name}:{self.key(data)}".encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"

    def sample(self, rng: random.Random, split: str = "train", canonical: bool = False) -> Problem:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        while True:
            data = self.draw(rng)
            if self.split_of(data) == split:
                break
        question = self.phrase(data, None if canonical else rng)
        return Problem(self.name, question, self.answer(data), data)

    def heldout(self, n: int, seed: int = 1234, canonical: bool = True) -> list[Problem]:
        """n distinct held-out problems, the same for every caller with the same seed."""
        rng, seen, out = random.Random(seed), set(), []
        for _ in range(n * 1000):
            p = self.sample(rng, "test", canonical=canonical)
            k = self.key(p.data)
            if k not in seen:
                seen.add(k)
                out.append(p)
                if len(out) == n:
                    return out
        raise ValueError(f"{self.name}: fewer than {n} distinct held-out problems exist")


_INT = re.compile(r"^[^\d-]*(-?\s*[\d,]+)\D*$")


def parse_int(text: str) -> int | None:
    """The single integer in a short answer ('1,017', 'A: -351.', '**42**'); None if not exactly one."""
    text = text.strip()
    m = _INT.match(text) if len(text) <= 40 else None
    if not m:
        return None
    digits = m.group(1).replace(",", "").replace(" ", "")
    try:
        return int(digits)
    except ValueError:
        return None


def surface(text: str, rng: random.Random | None) -> str:
    """Random surface noise people add: case, trailing punctuation, extra spaces."""
    if rng is None:
        return text
    r = rng.random()
    if r < 0.15:
        text = text.lower()
    elif r < 0.2:
        text = text.rstrip("?.!")
    if rng.random() < 0.1:
        text = text.replace(" ", "  ", 1)
    if rng.random() < 0.1:
        text = text + rng.choice([" Show your work.", " Explain.", " Thanks!", " Please."])
    return text
