"""What every task family provides: problems phrased many ways, a held-out split, worked
solutions, and a verifier.

A family draws a problem's *content* (operands, target) and a *phrasing* separately. The
held-out split is decided by a hash of the content key alone (`key`), so a test problem is
never trained on in any wording: `sample(rng, split="train")` rejects test keys and
`sample(rng, split="test")` rejects train keys. Wordings come from the family's phrasing
grammar (phrasing.py), whose held-out templates are never trained on either (`templates`). The
worked solution always opens by restating the problem in one canonical form, so the many
wordings all lead into the same reasoning.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from .phrasing import Phrasing

TEST_FRACTION = 0.05  # share of problem contents held out for evaluation
HELDOUT_PATIENCE = 2000  # draws in a row without a new held-out problem before `heldout` says the pool is spent


@dataclass(frozen=True)
class Problem:
    family: str
    question: str  # as a user would type it
    answer: str  # the canonical final answer
    data: dict = field(default_factory=dict, compare=False)  # operands etc., for the solution writer
    template: str = ""  # the phrasing frame the question was written from


class Task:
    """Subclasses set `name` and `phrasing` and implement draw(), key(), values(), answer(), solution()
    (and verify() when the answer is not one integer)."""

    name = "task"
    phrasing: Phrasing

    def draw(self, rng: random.Random) -> dict:
        """Random problem content."""
        raise NotImplementedError

    def key(self, data: dict) -> str:
        """Canonical identity of the content (e.g. the unordered operands of a sum)."""
        raise NotImplementedError

    def values(self, data: dict, rng: random.Random | None) -> dict:
        """What the phrasing's value slots are filled with ({a}, {nums}, ...)."""
        raise NotImplementedError

    def ask(self, data: dict, rng: random.Random | None, templates: str = "train") -> tuple[str, str]:
        """(question, frame): the problem in a random wording from the templates' split (the
        canonical wording when rng is None)."""
        return self.phrasing.compose(self.values(data, rng), rng, templates)

    def phrase(self, data: dict, rng: random.Random | None, templates: str = "train") -> str:
        return self.ask(data, rng, templates)[0]

    def answer(self, data: dict) -> str:
        raise NotImplementedError

    def solution(self, problem: Problem) -> str:
        """The worked reasoning that leads to the answer (goes inside <think>)."""
        raise NotImplementedError

    def verify(self, problem: Problem, answer: str) -> bool:
        """Is `answer` (the text after the reasoning) a correct final answer?"""
        got = parse_int(answer)
        return got is not None and str(got) == problem.answer

    def conversation(self, problem: Problem, thinking: bool = True) -> list[dict]:
        """The problem as a chat: the user's question, the worked reasoning, the final answer. With
        thinking off the reply shows the same working, then the answer on the next line: trained on the answer
        alone, a model this small answered wrong at once (0% on every arithmetic family). The newline after the
        working is then the token that follows it with thinking on too (there before `</think>`); a blank line
        (one token, `\n\n`) had left a model that took its habitual `\n`, `</think>` banned, off the path it was
        trained on (`-> 18\n\n(1+18)+7`)."""
        question = {"role": "user", "content": problem.question}
        if not thinking:
            return [question, {"role": "assistant", "content": f"{self.solution(problem)}\n{problem.answer}",
                               "thinking": False}]
        return [question, {"role": "assistant", "reasoning_content": self.solution(problem), "content": problem.answer}]

    # ---- shared machinery ----
    def split_of(self, data: dict) -> str:
        digest = hashlib.sha256(f"{self.name}:{self.key(data)}".encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"

    def sample(self, rng: random.Random, split: str = "train", canonical: bool = False,
               templates: str | None = None) -> Problem:
        """A problem of the split, worded from the trained templates or, with templates="test", the held-out ones."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        while True:
            data = self.draw(rng)
            if self.split_of(data) == split:
                break
        question, frame = self.ask(data, None if canonical else rng, templates or "train")
        return Problem(self.name, question, self.answer(data), data, frame)

    def heldout(self, n: int, seed: int = 1234, canonical: bool = True, templates: str = "train") -> list[Problem]:
        """n distinct held-out problems, the same for every caller with the same seed, worded
        canonically or from the trained (`templates="train"`) or held-out ("test") templates."""
        rng, seen, out, misses = random.Random(seed), set(), [], 0
        while misses < HELDOUT_PATIENCE:  # this many draws in a row found nothing new: the pool is spent
            p = self.sample(rng, "test", canonical=canonical, templates=templates)
            k = self.key(p.data)
            misses += 1
            if k not in seen:
                seen.add(k)
                out.append(p)
                misses = 0
                if len(out) == n:
                    return out
        raise ValueError(f"{self.name}: only {len(out)} distinct held-out problems exist (asked for {n})")


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
