"""The embedded default corpus: task-family conversations with worked reasoning, small talk
(small_talk.py), and Python code.

Nothing is downloaded: task problems are generated (train split only; the held-out split feeds
evaluation), and the code is the Python standard library's own source.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ..tokenizer import DeepSeekTokenizer
from .corpus import iter_documents
from .small_talk import exchange
from .tasks import get_task

# share of task documents per family: addition, which a small model learns first (a 4-layer
# MoE model trained from scratch for 15 minutes on a 2-core CPU, measured before nanoseek existed:
# held-out addition 98%, subtraction 79%, multiplication 67%, Countdown 5%), gets the least of the
# arithmetic; Countdown, the slowest to learn, the most
DEFAULT_MIX = {"add": 0.15, "sub": 0.25, "mul": 0.25, "countdown": 0.3, "linear": 0.05}
# chat SFT moves a twentieth from multiplication to addition: SFT'd from one pretrained model, held-out
# addition (200 problems, varied wording) went 93.5% -> 99.5% with multiplication staying at 95%;
# from another it stayed at 93% (the misses: a 3-digit plus a 2-digit number read from the wrong column)
SFT_MIX = {"add": 0.2, "sub": 0.25, "mul": 0.2, "countdown": 0.3, "linear": 0.05}


# training also asks with a single-digit operand now and then (people ask "7 plus 8"); evaluation
# keeps to the families' defaults (2-3 digits, 2x2 for multiplication)
TRAINING_OPTIONS = {"add": {"small_share": 0.1}, "sub": {"small_share": 0.1}, "mul": {"small_share": 0.1}}


def task_conversations(n: int, seed: int = 0, split: str = "train", mix: dict[str, float] | None = None,
                       no_thinking: float = 0.0) -> Iterator[list[dict]]:
    """n conversations (question, worked reasoning, answer), families drawn by `mix`, a share
    `no_thinking` of them answered with thinking off (Task.conversation)."""
    mix = mix or DEFAULT_MIX
    tasks = {name: get_task(name, **TRAINING_OPTIONS.get(name, {})) for name in mix}
    names, weights = list(mix), list(mix.values())
    rng, off = random.Random(seed), random.Random(seed + 1)  # the problems drawn do not depend on the share
    for _ in range(n):
        task = tasks[rng.choices(names, weights)[0]]
        yield task.conversation(task.sample(rng, split), thinking=off.random() >= no_thinking)


CHAT_FRACTION = 0.08  # of the built-in conversations: small talk
EARLIER_TURN = 0.15  # of the others: opened by an earlier exchange (a task problem or small talk)


def builtin_conversations(n: int, seed: int = 0, chat_fraction: float = CHAT_FRACTION, split: str = "train",
                          mix: dict[str, float] | None = None, no_thinking: float = 0.0) -> list[list[dict]]:
    """Task problems phrased many ways with worked solutions, mixed with small talk; some of
    either after an earlier exchange, so replies hold up after any previous turn. The earlier
    turns' answers are trained too (without their reasoning, as the chat template renders history).
    A share `no_thinking` of the replies is given with thinking off (small talk: the reply alone)."""
    rng, off = random.Random(seed), random.Random(seed + 2)
    tasks = task_conversations(n * 2, seed=seed + 1, split=split, mix=mix or SFT_MIX, no_thinking=no_thinking)
    out = []
    for _ in range(n):
        talk = rng.random() < chat_fraction
        conv = exchange(rng, split) if talk else next(tasks)
        if talk and off.random() < no_thinking:
            conv = [conv[0], {"role": "assistant", "content": conv[1]["content"], "thinking": False}]
        if rng.random() < (0.5 if talk else EARLIER_TURN):
            earlier = exchange(rng, split) if rng.random() < 0.5 else next(tasks)
            conv = [*earlier, *conv]
        out.append(conv)
    return out


def task_documents(tok: DeepSeekTokenizer, n: int, seed: int = 0, split: str = "train",
                   mix: dict[str, float] | None = None, no_thinking: float = 0.0) -> Iterator[str]:
    """The built-in conversations as chat-formatted documents (special tokens included) for the shards;
    `no_thinking` as in builtin_conversations."""
    for messages in builtin_conversations(n, seed, split=split, mix=mix or DEFAULT_MIX, no_thinking=no_thinking):
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
