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
# text that goes on from a client's prefix keeps its leading whitespace ("I am" + " nanoseek"), and text a stop string
# ended keeps what came before it ("I'm " before the stop string "nanoseek"), as OpenAI and DeepSeek return them
KEPT = [
    (" nanoseek, a model", False, {"continued": True}, ("", " nanoseek, a model")),
    ("\n    return a + b\n", False, {"continued": True}, ("", "\n    return a + b")),
    (" carry the 1\n</think>\n\n 19", True, {"continued": True}, (" carry the 1", "19")),
    (" still thinking ", True, {"continued": True}, (" still thinking", "")),
    ("I'm ", False, {"cut": True}, ("", "I'm ")),
    ("\nplan \n</think>\n\nI'm \n", True, {"cut": True}, ("plan", "I'm \n")),
    (" so far ", True, {"continued": True, "cut": True}, (" so far ", "")),
    (" x ", False, {"continued": True, "cut": True}, ("", " x ")),
]


@pytest.mark.parametrize("text, started, flags, expected", [(t, s, {}, e) for t, s, e in CASES] + KEPT)
def test_split_whole_and_streamed(text, started, flags, expected):
    assert split_reasoning(text, started, **flags) == expected
    rng = random.Random(len(text))
    for _ in range(20):  # every way of cutting the text into deltas gives the same result
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text), rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        s, got = ReasoningStream(started, continued=flags.get("continued", False)), {"reasoning": "", "answer": ""}
        for i, p in enumerate(pieces):
            final = i == len(pieces) - 1
            for kind, t in s.feed(p, final=final, cut=final and flags.get("cut", False)):
                got[kind] += t
        assert (got["reasoning"], got["answer"]) == expected  # exactly: stream and whole agree
        assert "</think>" not in got["reasoning"]
