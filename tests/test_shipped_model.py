"""The shipped chat model asked the way people type, in wordings written apart from the task code's
phrasing grammar (some, such as `what's 7 plus 8?` or `use 3, 5 and 7 to make 22`, are forms it
makes too): it must tell which task it is asked (Countdown vs an equation vs arithmetic) from the
content, and get the arithmetic right. Greedy, through the chat template, as the API asks it."""

import re
from pathlib import Path

import pytest

import nanoseek
from nanoseek.inference import Engine, SamplingParams
from nanoseek.tokenizer import DeepSeekTokenizer

SHIPPED = Path(nanoseek.__file__).parent / "assets" / "model"

# (question, the family its worked solution must be, the answer for arithmetic)
CASES = [
    ("What is 12 + 7?", "add", "19"), ("what's 7 plus 8?", "add", "15"), ("line one\nwhat's 7 plus 8?", "add", "15"),
    ("could you add 348 and 77 for me", "add", "425"), ("How much is 250 minus 75?", "sub", "175"),
    ("I need 903 - 458", "sub", "445"), ("Calculate 97 times 86", "mul", "8342"), ("What is 45*23?", "mul", "1035"),
    ("63 multiplied by 19 equals?", "mul", "1197"),
    ("Use 3, 5 and 7 to make 22 with + - * /", "countdown", None), ("Using the numbers 4, 9, 12 make 33", "countdown", None),
    ("Can you get 24 from 2, 3 and 4?", "countdown", None), ("Make 10 with 2, 5 and 1. Each number once.", "countdown", None),
    ("Numbers 6 8 3, target 42", "countdown", None), ("Combine 7, 2 and 9 to get 23", "countdown", None),
    ("Solve 3x + 5 = 20", "linear", None), ("Find x: 2x - 4 = 10", "linear", None),
    ("what is x if 5x + 1 = 26?", "linear", None),
]


def solved_as(reasoning: str) -> str:
    """Which family's worked solution the reasoning is (the traces of data/tasks)."""
    if re.search(r"^keep \d+ \(", reasoning, re.M):
        return "countdown"
    if re.search(r"\dx = ", reasoning):
        return "linear"
    head = re.match(r"\s*(\d+)([+\-*])(\d+):", reasoning)
    return {"+": "add", "-": "sub", "*": "mul"}[head.group(2)] if head else "none"


@pytest.fixture(scope="module")
def replies():
    model, tok = nanoseek.load_model(SHIPPED), DeepSeekTokenizer.load(SHIPPED)
    engine = Engine(model, decode=tok.decode, max_batch=len(CASES))
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q, _, _ in CASES]
    reqs = engine.generate(prompts, SamplingParams(max_new_tokens=400, temperature=0))
    return [tok.decode(r.tokens, skip_special_tokens=True).partition("</think>") for r in reqs]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=[q for q, _, _ in CASES])
def test_the_shipped_model_tells_the_task_from_the_content(replies, case):
    question, family, answer = CASES[case]
    reasoning, closed, reply = replies[case]
    assert closed and solved_as(reasoning) == family, reasoning
    if answer is not None:
        assert reply.strip() == answer, reasoning
