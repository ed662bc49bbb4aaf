"""Is small talk answered, and answered the same way every time? Phrasings of each intent
(data/small_talk.py) from the trained ones or the held-out ones (never trained on), asked on their
own or right after a task problem and its answer; a reply counts when it is the intent's reply exactly. Sampling at a temperature shows the
stability a chat user sees (several samples per question, each scored)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data.small_talk import INTENTS, say
from ..data.tasks import get_task
from ..inference import Engine, SamplingParams
from ..reasoning import split_reasoning
from ..tokenizer import DeepSeekTokenizer


@dataclass
class SmallTalkResult:
    after_task: bool
    temperature: float
    n: int  # replies scored
    accuracy: float  # share that are the intent's reply exactly
    misses: list[tuple[str, str]]  # (question, reply) of a few wrong replies

    def row(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "n": self.n, "misses": self.misses[:5]}


def small_talk_chats(n: int, after_task: bool, seed: int = 1234, templates: str = "test") -> list[tuple[list[dict], str]]:
    """n (messages, expected reply): phrasings of the templates' split, the intents in turn; after_task
    puts a held-out task problem and its answer first."""
    rng, out = random.Random(seed), []
    families = [get_task(f) for f in ("add", "sub", "mul", "countdown")]
    for i in range(n):
        intent = INTENTS[i % len(INTENTS)]
        chat = [{"role": "user", "content": say(intent, rng, templates)}]
        if after_task:
            task = families[i % len(families)]
            p = task.sample(rng, "test")
            chat = [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}, *chat]
        out.append((chat, intent.reply))
    return out


def evaluate_small_talk(engine: Engine, tok: DeepSeekTokenizer, n: int = 54, after_task: bool = False,
                        temperature: float = 0.0, samples: int = 1, seed: int = 1234, templates: str = "test",
                        max_new_tokens: int = 96) -> SmallTalkResult:
    chats = small_talk_chats(n, after_task, seed, templates)
    prompts = [tok.render_prompt(chat) for chat, _ in chats for _ in range(samples)]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i,
                             stop_token_ids=tuple(tok.eos_ids)) for i in range(len(prompts))]
    replies = engine.generate(prompts, params)
    hits, misses = 0, []
    for i, req in enumerate(replies):
        chat, expected = chats[i // samples]
        _, answer = split_reasoning(req.text, started=tok.opens_thinking(prompts[i]))
        if answer.strip() == expected:
            hits += 1
        else:
            misses.append((chat[-1]["content"], answer.strip()))
    return SmallTalkResult(after_task, temperature, len(replies), hits / len(replies), misses)
