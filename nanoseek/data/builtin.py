"""The embedded default corpus: task-family conversations with worked reasoning, short general
chat, and Python code.

Nothing is downloaded: task problems are generated (train split only; the held-out split feeds
evaluation), and the code is the Python standard library's own source.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ..tokenizer import DeepSeekTokenizer
from .corpus import iter_documents
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


# short general chat: (ways a person says it, reasoning, reply)
SMALL_TALK = [
    (["hi", "hello", "hey", "Hello!", "hi there", "good morning", "hey, how's it going?"],
     "The user is greeting me. I should greet them back and offer help.",
     "Hello! I'm nanoseek. Ask me an arithmetic question or a number puzzle and I'll work it out step by step."),
    (["who are you?", "what are you?", "What's your name?", "are you a human?", "introduce yourself"],
     "The user asks who I am. I am nanoseek, a small reasoning model.",
     "I'm nanoseek, a small DeepSeek-style reasoning model trained on a laptop. I think before I answer."),
    (["what can you do?", "how can you help me?", "what are you good at?", "help"],
     "The user asks what I can do. I am good at arithmetic and small number puzzles.",
     "I can add, subtract and multiply numbers, solve simple equations, and find ways to reach a target number "
     "from a few numbers (Countdown). I show my reasoning first."),
    (["thanks", "thank you!", "thx", "great, thanks", "that's helpful"],
     "The user thanks me. I should reply politely.", "You're welcome! Anything else?"),
    (["bye", "goodbye", "see you", "that's all"],
     "The user is leaving.", "Goodbye! Come back with more problems any time."),
    (["what's the weather today?", "who won the game last night?", "what is the latest news?",
      "what time is it?", "what's the stock price of apple?"],
     "The user asks about current events or live data. I have no internet access or live information.",
     "I can't access live information like weather, news, times or prices. I can help with arithmetic and puzzles."),
    (["write me an essay about history", "translate this into French: good morning", "write a poem about the sea",
      "tell me a story"],
     "The user asks for long writing. I am a very small model trained on arithmetic and puzzles, so I cannot do "
     "this well.",
     "I'm a very small model trained for arithmetic and number puzzles, so I can't write that well. "
     "Try me with a math question!"),
]


def small_talk(rng: random.Random) -> list[dict]:
    asks, reasoning, reply = rng.choice(SMALL_TALK)
    return [{"role": "user", "content": rng.choice(asks)},
            {"role": "assistant", "reasoning_content": reasoning, "content": reply}]


def builtin_conversations(n: int, seed: int = 0, chat_fraction: float = 0.05) -> list[list[dict]]:
    """Task problems phrased many ways with worked solutions, mixed with general chat."""
    rng = random.Random(seed)
    tasks = iter(task_conversations(n, seed=seed + 1, mix=SFT_MIX))
    return [small_talk(rng) if rng.random() < chat_fraction else next(tasks) for _ in range(n)]


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
