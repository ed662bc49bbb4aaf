"""Byte-level BPE (trained with HF `tokenizers`) with DeepSeek's special tokens, and chat rendering.

Every chat in nanoseek is rendered here and nowhere else:
- `render_conversation(messages)` -> (ids, loss_mask): SFT; the mask is 1 exactly on the tokens
  the assistant produces (its content and the end-of-sentence token that closes its turn);
- `render_prompt(messages)` -> ids: generation (engine, RL, eval, server); R1 style, the
  assistant turn opens with `<think>\\n` so a reasoning model starts by thinking.

The format is DeepSeek-V3/R1's: `<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜>`.
A reply with reasoning is `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`; reasoning is kept only in the
final message, and stripped from earlier assistant turns (the text after the last `</think>` stays).
The same rules are written as the Jinja `chat_template` saved in tokenizer_config.json, so
`transformers.AutoTokenizer` renders the same ids.

Digits are split one per token before BPE, so numbers are read and written digit by digit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
# control tokens (never produced by decoding with skip_special_tokens), then the think tags,
# which are ordinary text the model writes and the API parses
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, FIM_BEGIN, FIM_HOLE, FIM_END]
TEXT_TOKENS = [THINK, END_THINK]
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- if thinking is not defined %}{% set thinking = true %}{% endif -%}"
    "{{- bos_token -}}"
    "{{- messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join('\n\n') -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<｜User｜>' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] or '' -%}"
    "{%- if loop.last and m.get('reasoning_content') -%}"
    "{%- set content = '<think>\n' + m['reasoning_content'] + '\n</think>\n\n' + content -%}"
    "{%- elif not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' + ('<think>\n' if thinking else '') -}}{%- endif -%}"
)


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (unknown role, missing content, empty)."""


class DeepSeekTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        missing = [t for t in SPECIAL_TOKENS + TEXT_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks nanoseek's special tokens: {missing}")
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + TEXT_TOKENS}
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.user_id, self.assistant_id = ids[USER], ids[ASSISTANT]
        self.think_id, self.end_think_id = ids[THINK], ids[END_THINK]
        self.fim_begin_id, self.fim_hole_id, self.fim_end_id = ids[FIM_BEGIN], ids[FIM_HOLE], ids[FIM_END]

    # ---- training, saving, loading ----
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "DeepSeekTokenizer":
        """Train byte-level BPE on an iterator of documents (streamed; memory stays bounded).
        The vocabulary is vocab_size ids at most: fewer when the corpus has too few pairs to merge."""
        n_fixed = len(SPECIAL_TOKENS) + len(TEXT_TOKENS) + 256
        if vocab_size < n_fixed:
            raise ValueError(f"vocab_size must be at least {n_fixed} (special tokens + 256 bytes), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),  # one digit per token
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(TEXT_TOKENS), min_frequency=min_frequency, show_progress=False,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
        return cls(tok)

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json (with the chat template) for AutoTokenizer."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
            "chat_template": CHAT_TEMPLATE,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DeepSeekTokenizer":
        f = Path(directory) / "tokenizer.json"
        if not f.is_file():
            raise FileNotFoundError(f"{directory}: no tokenizer.json")
        return cls(Tokenizer.from_file(str(f)))

    # ---- text <-> ids ----
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token strings inside the text become their single ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ----
    def render_conversation(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """A conversation -> (ids, loss_mask); the mask is 1 on assistant-produced tokens."""
        _check(messages)
        system = self.encode("\n\n".join(m["content"] for m in messages if m["role"] == "system"))
        ids, mask = [self.bos_id] + system, [0] * (1 + len(system))

        def add(piece: list[int], trainable: bool):
            ids.extend(piece)
            mask.extend([int(trainable)] * len(piece))

        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "user":
                add([self.user_id] + self.encode(m["content"]), False)
            elif m["role"] == "assistant":
                add([self.assistant_id], False)
                add(self.encode(assistant_text(m, keep_reasoning=last)) + [self.eos_id], True)
        return ids, mask

    def chat_text(self, messages: Sequence[dict]) -> str:
        """The conversation as one document's text for pretraining shards, which add the BOS and the
        final EOS themselves: BOS + chat_text + EOS encodes to render_conversation's ids."""
        ids, _ = self.render_conversation(messages)
        return self.decode(ids[1:-1] if ids[-1] == self.eos_id else ids[1:])

    def render_prompt(self, messages: Sequence[dict], thinking: bool = True) -> list[int]:
        """The ids a model continues to answer the conversation's last user turn."""
        ids, _ = self.render_conversation(messages)
        return ids + [self.assistant_id] + (self.encode(THINK + "\n") if thinking else [])


def assistant_text(message: dict, keep_reasoning: bool) -> str:
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if keep_reasoning and reasoning:
        return f"{THINK}\n{reasoning}\n{END_THINK}\n\n{content}"
    if not keep_reasoning and END_THINK in content:
        return content.split(END_THINK)[-1].lstrip()
    return content


def _check(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise ChatFormatError(f"message {i}: unknown role {role!r} (expected one of {ROLES})")
        content = m.get("content")
        if m["role"] != "assistant" and not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({m['role']}): content must be a string")
        if m["role"] == "assistant" and content is not None and not isinstance(content, str):
            raise ChatFormatError(f"message {i} (assistant): content must be a string")
