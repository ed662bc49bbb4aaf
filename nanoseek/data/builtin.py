"""The embedded default corpus: task-family conversations with worked reasoning, and Python code.

Nothing is downloaded: task problems are generated (train split only; the held-out split feeds
evaluation), and the code is the Python standard library's own source.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ..tokenizer import DeepSeekTokenizer
from .corpus import iter_documents
from .tasks import get_task

# share of task documents per family: addition, which a small model learns first
# (shared/design/calibration.md), gets the least of the arithmetic; Countdown, the slowest to
# learn, the most
DEFAULT_MIX = {"add": 0.15, "sub": 0.25, "mul": 0.25, "countdown": 0.3, "linear": 0.05}
# chat SFT moves a twentieth from multiplication to addition: SFT'd from one pretrained model, held-out
# addition (200 problems, varied wording) went 93.5% -> 99.5% with multiplication staying at 95%;
# from another it stayed at 93% (the misses: a 3-digit plus a 2-digit number read from the wrong column)
SFT_MIX = {"add": 0.2, "sub": 0.25, "mul": 0.2, "countdown": 0.3, "linear": 0.05}


def task_conversations(n: int, seed: int = 0, split: str = "train",
                       mix: dict[str, float] | None = None) -> Iterator[list[dict]]:
    """n conversations (question, worked reasoning, answer), families drawn by `mix`."""
    mix = mix or DEFAULT_MIX
    tasks = {name: get_task(name) for name in mix}
    names, weights = list(mix), list(mix.values())
    rng = random.Random(seed)
    for _ in range(n):
        task = tasks[rng.choices(names, weights)[0]]
        yield task.conversation(task.sample(rng, split))


def task_documents(tok: DeepSeekTokenizer, n: int, seed: int = 0, split: str = "train",
                   mix: dict[str, float] | None = None) -> Iterator[str]:
    """The conversations as chat-formatted documents (special tokens included) for the shards."""
    for messages in task_conversations(n, seed, split, mix):
        yield tok.chat_text(messages)


def task_texts(n: int, seed: int = 0) -> Iterator[str]:
    """The conversations' plain text (no chat markup), to train a tokenizer on."""
    for messages in task_conversations(n, seed):
        yield "\n".join(m.get("reasoning_content", "") + "\n" + m["content"] for m in messages)


def code_documents(max_chars: int, split: str = "train", holdout_every: int = 20) -> Iterator[str]:
    """Standard-library source files until max_chars characters; every holdout_every-th file is
    the held-out split."""
    total = 0
    for i, doc in enumerate(iter_documents(["stdlib"], on_error="skip")):
        if (i % holdout_every == holdout_every - 1) != (split == "test"):
            continue
        if total >= max_chars:
            return
        total += len(doc)
        yield doc
