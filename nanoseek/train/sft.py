"""Chat SFT on the one training loop: loss only on what the assistant writes.

Conversations (`{"messages": [...]}` per jsonl line; assistant turns may carry
`reasoning_content`) are rendered by the tokenizer into (ids, loss_mask), turned into aligned
(inputs, targets) with targets only where the mask is 1, and best-fit packed into rows. The
built-in mixture ("builtin") is the task families' problems in their many phrasings with the
worked solution as reasoning, plus short general chat so the model behaves like a chatbot.
MTP keeps training during SFT, so the chat model still drafts well for speculative decoding.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..checkpoint import load_config, load_model, refuse_quantized
from ..data.builtin import builtin_conversations
from ..data.tool_use import tool_use_conversations
from ..data.shards import IGNORE, pack_documents
from ..files import numbered_jsonl, sha256_file
from ..model.config import ConfigError, padded_vocab
from ..tokenizer import ChatFormatError, DeepSeekTokenizer
from ..tools import CALCULATOR, CallFormat, describe_tools
from . import distributed as D
from .loop import Trainer
from .losses import LMObjective
from .runs import recorded_run, run_stage
from .settings import SFT_TRAIN, SFTConfig, TrainConfig


def read_conversations(path: str | Path) -> list[tuple[int, list[dict]]]:
    """A jsonl file of {"messages": [...]} lines -> (line number, messages) pairs; a malformed line
    stops with its file and line."""
    try:
        records = numbered_jsonl(path)
    except ValueError as e:
        hint = "" if str(path).endswith(".jsonl") else ' (conversations come as a .jsonl file of {"messages": [...]} lines)'
        raise ChatFormatError(str(e) + hint) from None
    for n, record in records:
        if not isinstance(record.get("messages"), list):
            raise ChatFormatError(f"{path}:{n}: expected an object with a 'messages' list")
    if not records:
        raise ChatFormatError(f"{path}: no conversations")
    return [(n, record["messages"]) for n, record in records]


def _user_example(tok: DeepSeekTokenizer, messages: list[dict], path: str, line: int) -> np.ndarray:
    try:
        example = sft_example(tok, messages)
    except ChatFormatError as e:
        raise ChatFormatError(f"{path}:{line}: {e}") from None
    if (example[1] == IGNORE).all():  # SFT learns only what the assistant writes
        raise ChatFormatError(f"{path}:{line}: no assistant message to learn from")
    return example


def builtin_mixture(tok: DeepSeekTokenizer, n: int, cfg: SFTConfig, seed: int) -> list[list[dict]]:
    """The built-in conversations, a share answered with thinking off, and (when the tokenizer has
    a tool-call format) calculator conversations on top, with the tools described as the server does."""
    convs = builtin_conversations(n, seed=seed, no_thinking=cfg.no_thinking_share)
    fmt = CallFormat.probe(tok)
    if fmt is not None and cfg.tool_share > 0:
        prompt = describe_tools([CALCULATOR], fmt)
        convs += list(tool_use_conversations(int(n * cfg.tool_share), prompt, seed=seed))
        random.Random(seed).shuffle(convs)
    return convs


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
        # an example longer than a row trains in row-sized pieces; a piece with no assistant token in it (the user's
        # part of a long conversation) teaches nothing and is left out (its steps logged a loss of 0)
        pieces = (e[:, start:start + seq_len] for e in examples for start in range(0, e.shape[1], seq_len))
        self.examples = [p for p in pieces if (p[1] != IGNORE).any()]
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
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


def sft(model_dir: str | Path, out: str | Path, cfg: SFTConfig | None = None, train: TrainConfig | None = None,
        device: str | None = None, console: Console | None = None, objective=None) -> dict[str, float]:
    """Fine-tune a model folder (weights + tokenizer) on conversations; writes out/model at the end.
    objective: default next-token (+ MTP) loss on assistant tokens; distillation passes its own."""
    cfg, train = cfg or SFTConfig(), train or SFT_TRAIN
    console = console or Console()
    refuse_quantized(model_dir)
    recorded_run(Path(out), "sft")  # (refused before the model loads: another command's folder, or a model's)
    context = load_config(model_dir)[0].max_position_embeddings
    if cfg.seq_len > context:  # (refused before the conversations are read: a huge one packed for minutes)
        raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the model's context ({context} tokens, "
                          "max_position_embeddings): give at most that")
    with D.process_group(device) as info:
        try:
            tok = DeepSeekTokenizer.load(model_dir)
            if cfg.data == "builtin":
                tok = tok.with_tool_tokens() if tok.own_format else tok
                convs = builtin_mixture(tok, cfg.builtin_conversations, cfg, seed=cfg.seed)
                held = builtin_mixture(tok, cfg.eval_conversations, cfg, seed=cfg.seed + 10_000)
                held = [c for c in held if c[-2]["content"] not in {x[-2]["content"] for x in convs}]
                examples, held_examples = [sft_example(tok, c) for c in convs], [sft_example(tok, c) for c in held]
            else:
                examples = [_user_example(tok, c, cfg.data, n) for n, c in read_conversations(cfg.data)]
                if len(examples) > 1:  # 2% held out, at least one
                    cut = max(1, len(examples) // 50)
                    held_examples, examples = examples[:cut], examples[cut:]
                else:  # one conversation: nothing to hold out, its loss is the training loss
                    held_examples = examples
        except ChatFormatError as e:
            raise ConfigError(str(e)) from None
        if info.main and (long := sum(e.shape[1] > cfg.seq_len for e in examples)):
            console.print(f"[yellow]{long:,} of {len(examples):,} conversations are longer than --seq-len "
                          f"{cfg.seq_len}[/]: each is trained in pieces of that length, a piece seeing only its own "
                          "part")
        model = load_model(model_dir, dtype=torch.float32, device=info.device)
        if tok.vocab_size > model.config.vocab_size:  # the tokenizer gained tokens (tool calls)
            model.resize_vocab(padded_vocab(tok.vocab_size))
        rows = SFTRows(examples, cfg.seq_len, cfg.batch_size, tok.pad_id, seed=cfg.seed, rank=info.rank,
                       world=info.world)

        def eval_batches():
            loader = SFTRows(held_examples, cfg.seq_len, cfg.batch_size, tok.pad_id, seed=1234, rank=info.rank,
                             world=info.world)
            n = max(1, min(8, len(loader._epoch_rows()) // (cfg.batch_size * info.world)))
            return [next(loader) for _ in range(n)]

        # the conversations' contents too: a resume after the file changed trained on other rows at the old cursor
        contents = {} if cfg.data == "builtin" else {"data_sha256": sha256_file(cfg.data)}
        run_config = {"command": "sft", "base_model": str(model_dir), "sft": {**asdict(cfg), **contents}}
        return run_stage(Trainer(out, model, rows, objective or LMObjective(cfg.mtp_lambda, info.device), train,
                                 eval_sets={"chat": eval_batches}, run_config=run_config, save_extra=tok.save,
                                 console=console, dist=info))
