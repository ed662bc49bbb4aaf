"""Separating reasoning from the answer, whole and streamed in arbitrary pieces."""

import random

import pytest

from nanoseek.reasoning import ReasoningStream, split_reasoning

CASES = [
    ("5+3: 5+3+0=8 c0 -> 8\n</think>\n\n8", True, ("5+3: 5+3+0=8 c0 -> 8", "8")),
    ("still thinking when cut off", True, ("still thinking when cut off", "")),
    ("</think>\n\nno reasoning at all", True, ("", "no reasoning at all")),
    ("<think>\nplan\n</think>\n\nanswer with </think> inside", False, ("plan", "answer with </think> inside")),
    ("a plain reply", False, ("", "a plain reply")),
    ("<thinking is not a tag", False, ("", "<thinking is not a tag")),
    # whitespace at either end of a part is dropped, whitespace inside kept, however it is cut
    ("\n step one \n\n step two \x1e", True, ("step one \n\n step two", "")),
    ("a  b \n</think>\n\n 7 \n", True, ("a  b", "7")),
    ("  a plain reply \n", False, ("", "a plain reply")),
]


@pytest.mark.parametrize("text, started, expected", CASES)
def test_split_whole_and_streamed(text, started, expected):
    assert split_reasoning(text, started) == expected
    rng = random.Random(len(text))
    for _ in range(20):  # every way of cutting the text into deltas gives the same result
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text), rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        s, got = ReasoningStream(started), {"reasoning": "", "answer": ""}
        for i, p in enumerate(pieces):
            for kind, t in s.feed(p, final=i == len(pieces) - 1):
                got[kind] += t
        assert (got["reasoning"], got["answer"]) == expected  # exactly: stream and whole agree
        assert "</think>" not in got["reasoning"]
