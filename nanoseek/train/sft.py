"""Chat SFT on the one training loop: loss only on what the assistant writes.

Conversations (`{"messages": [...]}` per jsonl line; assistant turns may carry
`reasoning_content`) are rendered by the tokenizer into (ids, loss_mask), turned into aligned
(inputs, targets) with targets only where the mask is 1, and best-fit packed into rows. The
built-in mixture ("builtin") is the task families' problems in their many phrasings with the
worked solution as reasoning, plus short general chat so the model behaves like a chatbot.
MTP keeps training during SFT, so the chat model still drafts well for speculative decoding.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..checkpoint import load_model
from ..data.builtin import SFT_MIX, task_conversations
from ..data.shards import IGNORE, pack_documents
from ..model.config import ConfigError
from ..tokenizer import ChatFormatError, DeepSeekTokenizer
from . import distributed as D
from .loop import TrainConfig, Trainer
from .pretrain import LMObjective, check_same_run, export

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


def read_conversations(path: str | Path) -> list[list[dict]]:
    """A jsonl file of {"messages": [...]} lines; a malformed line stops with its file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatFormatError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise ChatFormatError(f"{path}:{n}: expected an object with a 'messages' list")
            out.append(record["messages"])
    if not out:
        raise ChatFormatError(f"{path}: no conversations")
    return out


def sft_example(tok: DeepSeekTokenizer, messages: list[dict]) -> np.ndarray:
    """-> [2, L]: input ids and aligned targets (the next token where the assistant writes it, else -100)."""
    ids, mask = tok.render_conversation(messages)
    ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
    targets = np.full_like(ids, IGNORE)
    targets[:-1] = np.where(mask[1:], ids[1:], IGNORE)
    return np.stack([ids, targets])


class SFTRows:
    """Resumable stream of packed (input_ids, labels) micro-batches over a list of examples; each
    epoch packs the examples in a new seeded order. With world > 1, rows are dealt round robin."""

    def __init__(self, examples: list[np.ndarray], seq_len: int, batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.examples, self.seq_len, self.batch_size, self.pad_id = examples, seq_len, batch_size, pad_id
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.row, self._rows = 0, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.row, self._rows = s["epoch"], s["row"], None

    def _epoch_rows(self) -> list[np.ndarray]:
        if self._rows is None:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
            self._rows = pack_documents([self.examples[i] for i in order], self.seq_len, (self.pad_id, IGNORE))
        return self._rows

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = []
        for _ in range(self.batch_size * self.world):
            rows = self._epoch_rows()
            if self.row >= len(rows):
                self.epoch, self.row, self._rows = self.epoch + 1, 0, None
                rows = self._epoch_rows()
            picked.append(rows[self.row])
            self.row += 1
        batch = torch.from_numpy(np.stack(picked[self.rank::self.world]))  # (B, 2, T)
        return batch[:, 0], batch[:, 1]


@dataclass
class SFTConfig:
    data: str = "builtin"  # a .jsonl of conversations, or "builtin"
    builtin_conversations: int = 30_000
    seq_len: int = 512
    batch_size: int = 8
    eval_conversations: int = 300
    mtp_lambda: float = 0.3
    seed: int = 0


def sft(model_dir: str | Path, out: str | Path, cfg: SFTConfig | None = None, train: TrainConfig | None = None,
        device: str | None = None, console: Console | None = None, objective=None) -> dict[str, float]:
    """Fine-tune a model folder (weights + tokenizer) on conversations; writes out/model at the end.
    objective: default next-token (+ MTP) loss on assistant tokens; distillation passes its own."""
    cfg, train = cfg or SFTConfig(), train or TrainConfig(lr=5e-4, warmup_steps=20, schedule="cosine")
    console = console or Console()
    run_dir, info = Path(out), D.setup(device)
    try:
        tok = DeepSeekTokenizer.load(model_dir)
        if cfg.data == "builtin":
            convs = builtin_conversations(cfg.builtin_conversations, seed=cfg.seed)
            held = builtin_conversations(cfg.eval_conversations, seed=cfg.seed + 10_000)
            held = [c for c in held if c[0]["content"] not in {x[0]["content"] for x in convs}]
        else:
            convs = read_conversations(cfg.data)
            held, convs = convs[: max(1, len(convs) // 50)], convs[max(1, len(convs) // 50):]
        examples = [sft_example(tok, c) for c in convs]
        held_examples = [sft_example(tok, c) for c in held]
        run_config = {"command": "sft", "base_model": str(model_dir), "sft": asdict(cfg), "train": asdict(train)}
        old = run_dir / "config.json"
        if old.is_file():
            check_same_run(json.loads(old.read_text()), json.loads(json.dumps(run_config, default=str)))
        model = load_model(model_dir, dtype=torch.float32, device=info.device)
        rows = SFTRows(examples, cfg.seq_len, cfg.batch_size, tok.pad_id, seed=cfg.seed, rank=info.rank,
                       world=info.world)

        def eval_batches():
            loader = SFTRows(held_examples, cfg.seq_len, cfg.batch_size, tok.pad_id, seed=1234, rank=info.rank,
                             world=info.world)
            n = max(1, min(8, len(loader._epoch_rows()) // (cfg.batch_size * info.world)))
            return [next(loader) for _ in range(n)]

        trainer = Trainer(run_dir, model, rows, objective or LMObjective(cfg.mtp_lambda, info.device), train,
                          eval_sets={"chat": eval_batches}, run_config={k: v for k, v in run_config.items()
                                                                           if k != "train"},
                          save_extra=tok.save, console=console, dist=info)
        if trainer.finished:
            console.print(f"{run_dir} is already trained to step {trainer.step}")
            return {}
        result = trainer.fit()
        if info.main:
            export(trainer.checkpoints()[-1], run_dir / "model")
        return result
    except (ChatFormatError, ConfigError) as e:
        raise ConfigError(str(e)) from None
    finally:
        D.teardown()
