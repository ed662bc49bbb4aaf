"""Tokenizers and chat rendering: nanoseek's own byte-level BPE, and any Hugging Face tokenizer folder.

A tokenizer folder is `tokenizer.json` (HF `tokenizers`), `tokenizer_config.json` (special
tokens and the Jinja `chat_template`) and optionally `generation_config.json` (end-of-sequence
ids, default sampling). `DeepSeekTokenizer.load(folder)` reads what DeepSeek publishes (V2's
`User: ... Assistant:` text, V3's tool-call tokens, R1's and the R1-Distill models' `<think>`) and
what `DeepSeekTokenizer.train` + `save` write.

Every chat in nanoseek is rendered here and nowhere else:
- `render_prompt(messages)` -> ids: generation (engine, RL, eval, server), through the folder's
  own chat template, rendered in a sandboxed Jinja environment the way transformers'
  `apply_chat_template` renders it (so a prompt is the ids the model was trained on);
- text a client sent (messages, tools, a completion prompt) never becomes control tokens:
  `render_prompt` renders it with each control-token string held as a placeholder, then encodes
  those as plain text (`encode_text`); only the template itself writes `<｜User｜>` and the like;
- `render_conversation(messages)` -> (ids, loss_mask): SFT in nanoseek's own format; the mask is
  1 exactly on the tokens the assistant produces (its content and the end-of-sentence token that
  closes its turn).

nanoseek's own format is DeepSeek-V3/R1's: `<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜>`.
A reply with reasoning is `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`; reasoning is kept only in the
final message, and stripped from earlier assistant turns (the text after the last `</think>` stays);
R1 style, the generation prompt opens the reply with `<think>\\n` so the model starts by thinking.
The same rules are written as the Jinja `CHAT_TEMPLATE` saved in tokenizer_config.json.
nanoseek's own tokenizer splits digits one per token before BPE, so numbers are read and written
digit by digit.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
# DeepSeek-V3's tool tokens: a block of calls, one call, its name/arguments separator, and the results
CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                                                "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>")
OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END = ("<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
                                                        "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>")
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_TOKENS = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN, OUTPUT_END,
               TOOL_SEP]
# control tokens (never produced by decoding with skip_special_tokens), then the think tags,
# which are ordinary text the model writes and the API parses
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, FIM_BEGIN, FIM_HOLE, FIM_END]
TEXT_TOKENS = [THINK, END_THINK]
ROLES = ("system", "user", "assistant", "tool")
# While a chat template renders, the control tokens written inside message text stand as
# characters of Unicode's Supplementary Private Use Area-A (the i-th control token as PLACEHOLDER + i),
# so the rendered prompt tells them apart from the template's own control tokens.
PLACEHOLDER = 0xF0000
NO_THINKING = f"{THINK}\n\n{END_THINK}\n\n"  # an empty reasoning block: the reply answers at once

# nanoseek's own template: DeepSeek-V3's (tool calls and results in V3's tokens, no <｜Assistant｜>
# after tool results: the reply goes on from them), R1's reasoning rules, and V3.1's hybrid
# thinking: thinking=False opens the reply with an empty reasoning block
CHAT_TEMPLATE = (
    "{%- if thinking is not defined %}{% set thinking = true %}{% endif -%}"
    "{{- bos_token -}}"
    "{{- messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join('\n\n') -}}"
    "{%- set ns = namespace(after_tool=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<｜User｜>' + m['content'] -}}{%- set ns.after_tool = false -%}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if not ns.after_tool %}{{- '<｜tool▁outputs▁begin｜>' -}}{% endif -%}"
    "{{- '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<｜tool▁outputs▁end｜>' -}}{% endif -%}"
    "{%- set ns.after_tool = true -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] or '' -%}"
    "{%- if loop.last and m.get('reasoning_content') -%}"
    "{%- set content = '<think>\n' + m['reasoning_content'] + '\n</think>\n\n' + content -%}"
    "{%- elif not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{{- ('' if ns.after_tool else '<｜Assistant｜>') + content -}}"
    "{%- if m.get('tool_calls') -%}"
    "{{- '<｜tool▁calls▁begin｜>' -}}"
    "{%- for c in m['tool_calls'] -%}"
    "{%- if not loop.first %}{{- '\n' -}}{% endif -%}"
    "{{- '<｜tool▁call▁begin｜>' + (c.get('type') or 'function') + '<｜tool▁sep｜>' + c['function']['name'] + "
    "'\n```json\n' + c['function']['arguments'] + '\n```<｜tool▁call▁end｜>' -}}"
    "{%- endfor -%}"
    "{{- '<｜tool▁calls▁end｜>' -}}"
    "{%- endif -%}"
    "{{- '<｜end▁of▁sentence｜>' -}}"
    "{%- set ns.after_tool = false -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and not ns.after_tool -%}"
    "{{- '<｜Assistant｜>' + ('<think>\n' if thinking else '<think>\n\n</think>\n\n') -}}"
    "{%- endif -%}"
)


def _bos_first(tok: Tokenizer) -> Tokenizer:
    """nanoseek's own tokenizer with the BOS in front of what transformers' tokenizer encodes with special tokens (its
    post-processor), as the server puts it in front of a text prompt and pretraining in front of every document: so
    `AutoTokenizer(text)` (vLLM, lm-evaluation-harness with add_bos_token) gives the ids nanoseek scores."""
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (unknown role, missing content, empty, or refused by
    the model's chat template)."""


OWN_CONFIG = {  # tokenizer_config.json of nanoseek's own tokenizers
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
    "add_bos_token": True, "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 1 << 30,
    "chat_template": CHAT_TEMPLATE,
}
# generation_config.json of nanoseek's own models: greedy unless a request says otherwise (a model this small answers
# best greedily, as its report card measures it; sampled at the API's usual temperature 1 it missed 667 + 667 one
# time in six)
OWN_GENERATION = {"do_sample": False}
# generation_config.json fields a server may default to, with the values the engine takes
SAMPLING_DEFAULTS = {"temperature": (0, 100), "top_p": (0, 1), "top_k": (0, None)}


def _usable_generation(generation: dict, vocab_size: int) -> dict:
    """generation_config.json without the values nanoseek cannot use (a string temperature, top_p 5, an eos id
    outside the vocabulary), each dropped with a warning: they failed every request later, blamed on the client."""
    usable = dict(generation)

    def drop(key: str, why: str) -> None:
        warnings.warn(f"generation_config.json: {key} {generation[key]!r} is {why}; ignored", stacklevel=4)
        del usable[key]

    for key, (low, high) in SAMPLING_DEFAULTS.items():
        value = generation.get(key)
        whole = key == "top_k"
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not math.isfinite(value):
            drop(key, "not an integer" if whole else "not a number")
        elif value < low or (high is not None and value > high):
            drop(key, f"outside [{low}, {high if high is not None else 'inf'}]")
    if "do_sample" in generation and not isinstance(generation["do_sample"], bool):
        drop("do_sample", "not true or false")
    eos = generation.get("eos_token_id")
    if (good := _eos_ids(eos, vocab_size, "generation_config.json")) != ([] if eos is None else eos if isinstance(eos, list) else [eos]):
        usable["eos_token_id"] = good
    return usable


def _eos_ids(value, vocab_size: int, source: str) -> list[int]:
    """An eos_token_id field (an id, a list of them, null) as the token ids of this vocabulary in it; any other entry
    dropped with a warning (a list keeps its good ids: one stray id once lost them all)."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    good = [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size]
    if len(good) < len(ids):
        bad = [i for i in ids if i not in good]
        warnings.warn(f"{source}: eos_token_id {bad!r} {'is' if len(bad) == 1 else 'are'} not token ids of this "
                      f"vocabulary (0-{vocab_size - 1}); ignored", stacklevel=4)
    return good


_LONG_RUN = re.compile(r"\S{256}")


def _break_long_runs(text: str) -> str:
    """Text with a space after every 256 characters of an unbroken run: BPE training rescans a whole
    pre-token at each merge, and one run of 200,000 characters took 32 s to train on (the trained
    tokenizer is unaffected; no merge is that long)."""
    return _LONG_RUN.sub(lambda m: m.group(0) + " ", text)


class DeepSeekTokenizer:
    """A tokenizer with its chat template. `tokenizer` is the HF `tokenizers` object; `config` the
    tokenizer_config.json dict (nanoseek's own when not given); `generation` the generation_config.json
    dict, if any; `model_eos` the model's config.json eos_token_id, which ends replies too where the folder has no
    generation_config.json (as transformers' generate reads it). Ids of tokens a tokenizer lacks (R1-Distill has no
    FIM tokens, V2 no <think>) are None."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, generation: dict | None = None,
                 model_eos: int | list[int] | None = None):
        self.tok = tokenizer
        self.config = dict(OWN_CONFIG if config is None else config)
        self.generation = _usable_generation(generation or {}, tokenizer.get_vocab_size())

        def special(name: str, fallback: str | None) -> int | None:
            text = _token_text(self.config.get(name)) or fallback
            return None if text is None else tokenizer.token_to_id(text)

        self.bos_id, self.eos_id = special("bos_token", BOS), special("eos_token", EOS)
        self.pad_id = special("pad_token", PAD)
        if self.eos_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token (tokenizer_config.json eos_token)")
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + TEXT_TOKENS}
        self.user_id, self.assistant_id = ids[USER], ids[ASSISTANT]
        self.think_id, self.end_think_id = ids[THINK], ids[END_THINK]
        self.fim_begin_id, self.fim_hole_id, self.fim_end_id = ids[FIM_BEGIN], ids[FIM_HOLE], ids[FIM_END]
        V = tokenizer.get_vocab_size()
        self.eos_ids = frozenset([self.eos_id, *_eos_ids(self.generation.get("eos_token_id"), V, "generation_config.json"),
                                  *_eos_ids(model_eos, V, "config.json")])
        self.chat_template = _pick_template(self.config.get("chat_template"))
        # DeepSeek's tool-call and tool-output tokens this vocabulary has (V3's, R1's and nanoseek's own)
        self.tool_ids = frozenset(i for t in TOOL_TOKENS if (i := tokenizer.token_to_id(t)) is not None)

    @property
    def added_ids(self) -> frozenset[int]:
        """Ids of the added tokens (control tokens and tags such as <think>), matched whole in text."""
        return frozenset(self.tok.get_added_tokens_decoder())

    @property
    def sampling_defaults(self) -> dict:
        """Default sampling from generation_config.json (e.g. R1-Distill: temperature 0.6, top_p 0.95)."""
        if not self.generation.get("do_sample", True):
            return {"temperature": 0.0}
        return {k: self.generation[k] for k in SAMPLING_DEFAULTS if self.generation.get(k) is not None}

    @property
    def think_tags(self) -> frozenset[int]:
        """The ids of <think> and </think> the vocabulary has: what a reply asked with thinking off may not write (a
        model that always closed its reasoning before answering closed the block the prompt had closed already)."""
        return frozenset({self.think_id, self.end_think_id} - {None})

    @property
    def own_format(self) -> bool:
        """nanoseek's own chat tokens are all there (training renders conversations token by token)."""
        return None not in (self.bos_id, self.user_id, self.assistant_id, self.think_id, self.end_think_id)

    # ---- training, saving, loading ----
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "DeepSeekTokenizer":
        """Train byte-level BPE on an iterator of documents (streamed; memory stays bounded).
        The vocabulary is vocab_size ids at most: fewer when the corpus has too few pairs to merge."""
        n_fixed = len(SPECIAL_TOKENS) + len(TOOL_TOKENS) + len(TEXT_TOKENS) + 256
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
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + TOOL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator((_break_long_runs(t) for t in texts), trainer=trainer)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
        return cls(_bos_first(tok), generation=OWN_GENERATION)

    def shortfall(self, asked: int) -> str | None:
        """A note where training made fewer tokens than `asked` (a small corpus), else None."""
        if self.vocab_size >= asked:
            return None
        return (f"{asked:,} tokens were asked for; the corpus holds too little text for more than {self.vocab_size:,} "
                "(every pair of tokens seen twice or more is already merged)")

    def with_tool_tokens(self) -> "DeepSeekTokenizer":
        """This tokenizer (nanoseek's own) with DeepSeek-V3's tool tokens appended, if missing, and
        the current chat template: how a model trained before tools existed learns them."""
        tok = Tokenizer.from_str(self.tok.to_str())
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOOL_TOKENS
                                if tok.token_to_id(t) is None])
        config = {**self.config, "chat_template": CHAT_TEMPLATE, "add_bos_token": True}
        return DeepSeekTokenizer(_bos_first(tok), config, self.generation or OWN_GENERATION)

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json (with the chat template) for AutoTokenizer, and
        generation_config.json when the tokenizer came with one."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(self.config, ensure_ascii=False, indent=2))
        if self.generation:
            (d / "generation_config.json").write_text(json.dumps(self.generation, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DeepSeekTokenizer":
        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{directory}: no tokenizer.json")

        def read(name: str) -> dict | None:
            f = d / name
            if not f.is_file():
                return None
            try:
                value = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: invalid JSON ({e})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{f}: a JSON object expected, not a {type(value).__name__}")
            return value

        config = read("tokenizer_config.json")
        if config is None:  # nanoseek always writes one: a folder without it is another's, its chat format unknown
            config = {k: v for k, v in OWN_CONFIG.items() if k != "chat_template"}
        if not config.get("chat_template") and (d / "chat_template.jinja").is_file():
            config["chat_template"] = (d / "chat_template.jinja").read_text()  # transformers v5 keeps it apart
        try:
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot read
            raise ValueError(f"{d / 'tokenizer.json'}: not a tokenizer the tokenizers library can read ({e})") from None
        generation = read("generation_config.json")
        model_eos = (read("config.json") or {}).get("eos_token_id") if generation is None else None
        return cls(tok, config, generation, model_eos)

    # ---- text <-> ids ----
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token strings inside the text become their single ids (for text
        nanoseek writes: rendered prompts, training documents)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    @cached_property
    def text_prefix(self) -> tuple[int, ...]:
        """What goes in front of a text prompt (a raw completion): what this tokenizer puts in front of a text it encodes
        with special tokens (its post-processor), as transformers (5: add_bos_token is not read beside a tokenizer.json)
        and vLLM encode one; for nanoseek's own tokenizers the BOS, which pretraining put in front of every document
        (those written before their post-processor said so)."""
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        if len(full) > len(plain) and full[len(full) - len(plain):] == plain:
            return tuple(full[:len(full) - len(plain)])
        own = all(self.config.get(k) == OWN_CONFIG[k] for k in ("tokenizer_class", "model_max_length"))  # (since the first)
        return (self.bos_id,) if self.bos_id is not None and own else ()

    def encode_prompt(self, text: str, control: bool = False) -> tuple[list[int], int]:
        """A text prompt as the model reads it -> (ids, how many of them lead it without being in `text`): after
        `text_prefix`, unless the text writes it out itself (lm-evaluation-harness with tokenized_requests=False sends
        the ids it counted, its BOS too, decoded to text: read as text after another BOS, its context was 20 tokens
        longer than it counted). Control-token strings in it stay text (`encode_text`: a client's prompt), or with
        `control` become their tokens (`encode`: a prompt typed at the terminal)."""
        written = self.decode(self.text_prefix)
        if self.text_prefix and text.startswith(written):
            return list(self.text_prefix) + (self.encode if control else self.encode_text)(text[len(written):]), 0
        return list(self.text_prefix) + (self.encode if control else self.encode_text)(text), len(self.text_prefix)

    def encode_text(self, text: str) -> list[int]:
        """Text a client sent to ids: control-token strings inside it (`<｜User｜>`, `<｜end▁of▁sentence｜>`,
        FIM and tool tokens...) stay plain text, so no one forges a turn by typing one. The think
        tags, which models write as text, stay tags."""
        return _ids(self._plain, text)

    @cached_property
    def longest_token_chars(self) -> int:
        """At least the most characters one token's text holds (a text of n characters is at least n / this many
        tokens): the longest vocabulary entry (a byte-level entry writes a byte a character, so its text is no longer)."""
        return max(1, max(map(len, self.tok.get_vocab(with_added_tokens=True))))

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The added tokens that structure a prompt (every one but the think tags), longest first."""
        added = (t.content for t in self.tok.get_added_tokens_decoder().values())
        return tuple(sorted({t for t in added if t not in TEXT_TOKENS}, key=len, reverse=True))

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """The ids of the tokens this tokenizer marks special: what decoding with skip_special_tokens leaves out."""
        return frozenset(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def _plain(self) -> Tokenizer:
        """This tokenizer with its control tokens never matched in text (`encode_special_tokens`
        skips the tokens marked special, so every control token is marked special)."""
        spec = json.loads(self.tok.to_str())
        for t in spec["added_tokens"]:
            t["special"] = t["special"] or t["content"] in self.control_tokens
        plain = Tokenizer.from_str(json.dumps(spec))
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def _placeholders(self) -> tuple[dict[str, str], re.Pattern, re.Pattern]:
        """(control token -> its placeholder, the pattern of the tokens, the pattern of the placeholders)."""
        stand_in = {t: chr(PLACEHOLDER + i) for i, t in enumerate(self.control_tokens)}
        if not stand_in:
            return stand_in, re.compile("(?!)"), re.compile("(?!)")  # patterns that match nothing
        tokens = re.compile("|".join(map(re.escape, self.control_tokens)))
        return stand_in, tokens, re.compile(f"([{chr(PLACEHOLDER)}-{chr(PLACEHOLDER + len(stand_in) - 1)}])")

    def _protected(self, value):
        """Strings (also dict keys) anywhere in `value` with each control token replaced by its placeholder.
        (A client's own character in that range reads as the placeholder: as that token's text, still plain text.)"""
        if isinstance(value, str):
            stand_in, tokens, _ = self._placeholders
            return tokens.sub(lambda m: stand_in[m.group()], value)
        if isinstance(value, dict):
            return {self._protected(k): self._protected(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._protected(v) for v in value]
        return value

    def _encode_rendered(self, text: str) -> list[int]:
        """A prompt rendered from protected messages to ids: the template's control tokens are
        tokens, the placeholders their token's text."""
        ids = []
        for i, piece in enumerate(self._placeholders[2].split(text)):
            if i % 2:  # a placeholder
                ids += self.encode_text(self.control_tokens[ord(piece) - PLACEHOLDER])
            elif piece:
                ids += _ids(self.tok, piece)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ----
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **variables) -> str:
        """The conversation as text, rendered by the tokenizer's chat template the way transformers
        does (sandboxed Jinja, trim_blocks and lstrip_blocks, the special tokens as variables, extra
        template variables such as `thinking` passed through)."""
        _check(messages, ROLES)
        if not self.chat_template:
            raise ChatFormatError("this tokenizer has no chat template (tokenizer_config.json chat_template)")
        empty, as_object = self.call_shape
        return self._render([_shaped(m, empty, as_object) for m in messages], add_generation_prompt, tools, variables)

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                variables: dict) -> str:
        specials = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **specials, **variables)
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatFormatError(f"the chat template refused the conversation: {e}") from None  # e.g. content None

    @cached_property
    def call_shape(self) -> tuple[bool, bool]:
        """How this chat template takes an assistant turn that calls tools: (its content "" rather than None, each
        call's arguments an object rather than OpenAI's JSON string). DeepSeek's templates tell such a turn by its
        content None and write the arguments as given; Qwen's and Llama's (transformers' convention) test the content
        as text and write `arguments | tojson`, which writes a string's JSON quoted. The first shape in which a
        placeholder call renders with its arguments as written; (False, False), OpenAI's, where none does (a
        template that renders no calls). `apply_chat_template` gives every call turn this shape."""
        call = {"id": "call_0", "type": "function", "function": {"name": "nanoseek_shape", "arguments": '{"shape": 1}'}}
        turns = [{"role": "user", "content": "shape"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
        for shape in ((False, False), (True, False), (False, True), (True, True)):
            try:
                text = self._render([_shaped(m, *shape) for m in turns], False, None, {})
            except ChatFormatError:
                continue
            if "nanoseek_shape" in text and '{"shape": 1}' in text:
                return shape
        return False, False

    def render_prompt(self, messages: Sequence[dict], thinking: bool = True, tools: list[dict] | None = None,
                      variables: dict | None = None) -> list[int]:
        """The ids a model continues to answer the conversation's last turn. thinking=False asks the
        template not to open a reasoning block (the variables `thinking`, DeepSeek-V3.1's, and `enable_thinking`,
        Qwen3's); a template that opens one anyway (R1 and the R1-Distill models) gets it closed empty, so the model
        answers directly. `variables`: more of the template's own (vLLM's chat_template_kwargs). Control
        tokens inside the messages and tools are read as text (see encode_text)."""
        text = self.apply_chat_template(self._protected(messages), add_generation_prompt=True,
                                        tools=self._protected(tools), **thinking_variables(thinking, variables))
        if not thinking and text.rstrip().endswith(THINK):
            text = text.rstrip() + "\n\n" + END_THINK + "\n\n"
        return self._encode_rendered(text)

    def render_prefixed(self, messages: Sequence[dict], prefix: str, reasoning: str | None = None,
                        thinking: bool = True, tools: list[dict] | None = None,
                        variables: dict | None = None) -> tuple[list[int], bool]:
        """Chat prefix completion: the ids of a reply that starts as given, and whether the model
        continues inside its reasoning. Where the template opens a reasoning block and thinking is on,
        `prefix` (the prefix message's content) starts the reasoning; with `reasoning` (its
        reasoning_content) the reasoning starts with that instead, and a non-empty `prefix` then
        starts the answer after it (`reasoning=""`: an answer that starts with `prefix`, no reasoning).
        A prefix that opens with `<think>` writes the reply raw, tag included. With thinking off the
        reasoning block is closed empty and `prefix` starts the answer."""
        variables = thinking_variables(thinking, variables)
        text = self.apply_chat_template(self._protected(messages), add_generation_prompt=True,
                                        tools=self._protected(tools), **variables)
        prefix, reasoning = self._protected(prefix), self._protected(reasoning)
        head = text.rstrip()
        if not head.endswith(THINK):  # no reasoning block to open: the reply is the prefix onwards
            return self._encode_rendered(self._continued(messages, prefix, text, tools, variables)), \
                prefix.rfind(THINK) > prefix.rfind(END_THINK)
        if prefix.lstrip().startswith(THINK):
            reply = prefix
        elif not thinking:
            reply = THINK + "\n\n" + END_THINK + "\n\n" + prefix
        elif reasoning is None:
            reply = text[len(head) - len(THINK):] + prefix
        else:
            reply = text[len(head) - len(THINK):] + reasoning + (f"\n{END_THINK}\n\n{prefix}" if prefix else "")
        prompt = head[: -len(THINK)] + reply
        return self._encode_rendered(prompt), reply.rfind(THINK) > reply.rfind(END_THINK)

    def _continued(self, messages: Sequence[dict], prefix: str, prompt: str, tools: list[dict] | None,
                   variables: dict) -> str:
        """The rendered conversation up to the end of `prefix` as the content of a last assistant message, as
        transformers' continue_final_message cuts it (DeepSeek-V2's template writes `Assistant: ` before a
        reply's content where its generation prompt ends at `Assistant:`); `prompt` + `prefix` where the
        template changes the content or puts more than spaces between the generation prompt and it."""
        if not prefix:
            return prompt
        final = self.apply_chat_template(self._protected([*messages, {"role": "assistant", "content": prefix}]),
                                         add_generation_prompt=False, tools=self._protected(tools), **variables)
        at = final.rfind(prefix)
        if at < len(prompt) or not final.startswith(prompt) or final[len(prompt):at].strip():  # (at -1: not found)
            return prompt + prefix
        return final[:at + len(prefix)]

    def opens_thinking(self, prompt: Sequence[int]) -> bool:
        """Does the prompt end inside an open <think> block (the reply starts with reasoning)?"""
        return self.decode(list(prompt[-4:])).rstrip().endswith(THINK)

    def render_conversation(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """A conversation in nanoseek's own format -> (ids, loss_mask); the mask is 1 on
        assistant-produced tokens. A last assistant message with `"thinking": False` is rendered
        after the empty reasoning block that opens a reply with thinking off."""
        _check(messages)
        if not self.own_format:
            raise ChatFormatError("rendering for training needs nanoseek's chat tokens (<｜User｜>, <｜Assistant｜>, "
                                  "<think>); this tokenizer lacks some")
        system = self.encode("\n\n".join(m["content"] for m in messages if m["role"] == "system"))
        ids, mask = [self.bos_id] + system, [0] * (1 + len(system))

        def add(piece: list[int], trainable: bool):
            ids.extend(piece)
            mask.extend([int(trainable)] * len(piece))

        after_tool = False
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "user":
                add([self.user_id] + self.encode(m["content"]), False)
                after_tool = False
            elif m["role"] == "tool":
                first = i == 0 or messages[i - 1]["role"] != "tool"
                close = last or messages[i + 1]["role"] != "tool"
                add(self.encode((OUTPUTS_BEGIN if first else "") + OUTPUT_BEGIN + m["content"] + OUTPUT_END
                                + (OUTPUTS_END if close else "")), False)
                after_tool = True
            elif m["role"] == "assistant":
                head = "" if after_tool else ASSISTANT
                head += NO_THINKING if last and m.get("thinking") is False else ""
                add(self.encode(head), False)
                add(self.encode(assistant_text(m, keep_reasoning=last) + calls_text(m)) + [self.eos_id], True)
                after_tool = False
        return ids, mask

    def chat_text(self, messages: Sequence[dict]) -> str:
        """The conversation as one document's text for pretraining shards, which add the BOS and the
        final EOS themselves: BOS + chat_text + EOS encodes to render_conversation's ids."""
        ids, _ = self.render_conversation(messages)
        return self.decode(ids[1:-1] if ids[-1] == self.eos_id else ids[1:])



def is_text(value: str) -> bool:
    """Whether a string read from the terminal or the command line is text: bytes that are not UTF-8 come in as
    lone surrogates (Python's surrogateescape), which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """tokenizer.encode(text).ids through encode_batch, which lets other Python threads run meanwhile
    (encode holds the GIL): a server tokenizing a long prompt in a thread keeps answering."""
    return tokenizer.encode_batch([text], add_special_tokens=False)[0].ids


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _pick_template(value) -> str | None:
    """chat_template is a string, or a list of named templates (the one named 'default' is used)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile_template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)  # transformers' filter
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatFormatError(f"the chat template does not parse: {e}") from None


def assistant_text(message: dict, keep_reasoning: bool) -> str:
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if keep_reasoning and reasoning:
        return f"{THINK}\n{reasoning}\n{END_THINK}\n\n{content}"
    if not keep_reasoning and END_THINK in content:
        return content.split(END_THINK)[-1].lstrip()
    return content


def calls_text(message: dict) -> str:
    """An assistant message's tool calls in DeepSeek-V3's tokens ('' without calls)."""
    calls = message.get("tool_calls") or []
    if not calls:
        return ""
    return CALLS_BEGIN + "\n".join(f"{CALL_BEGIN}{c.get('type') or 'function'}{TOOL_SEP}{c['function']['name']}\n```json\n"
                                   f"{_arguments(c['function']['arguments'])}\n```{CALL_END}" for c in calls) + CALLS_END


def _arguments(arguments: str | dict) -> str:
    """A call's arguments as JSON text: OpenAI's API sends them as a string, many datasets as an object."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


TEMPLATE_NAMES = frozenset({"messages", "tools", "add_generation_prompt"})  # what rendering itself passes a template


THINKING_NAMES = ("thinking", "enable_thinking")  # the variables DeepSeek-V3.1's and Qwen3's templates turn thinking by


def thinking_variables(thinking: bool, variables: dict | None = None) -> dict:
    """A template's variables: the caller's (`variables`), and thinking on or off as DeepSeek-V3.1's (`thinking`) and
    Qwen3's (`enable_thinking`) templates read it."""
    return {**(variables or {}), **dict.fromkeys(THINKING_NAMES, thinking)}


def _shaped(message: dict, empty: bool, as_object: bool) -> dict:
    """An assistant turn's tool calls in the shape a template takes (DeepSeekTokenizer.call_shape): no content as ""
    where `empty` (else as given), arguments as a JSON string or as the object it holds (a string that holds no object
    stays as it is)."""
    calls = message.get("tool_calls") if message.get("role") == "assistant" else None
    if not calls or not isinstance(calls, list):
        return message
    shaped = [{**c, "function": {**c["function"], "arguments": _as_arguments(c["function"].get("arguments"), as_object)}}
              if isinstance(c, dict) and isinstance(c.get("function"), dict) else c for c in calls]
    content = message.get("content")
    return {**message, "content": "" if empty and content is None else content, "tool_calls": shaped}


def _as_arguments(arguments, as_object: bool):
    if as_object and isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return _arguments(arguments) if not as_object and isinstance(arguments, dict) else arguments


def _check_calls(i: int, calls) -> None:
    """An assistant message's tool_calls as OpenAI's API writes them: [{"function": {"name", "arguments"}}, ...]."""
    if not isinstance(calls, list):
        raise ChatFormatError(f"message {i} (assistant): tool_calls must be a list, not a {type(calls).__name__}")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        where = f"message {i} (assistant): tool_calls[{j}]"
        if not isinstance(function, dict):
            raise ChatFormatError(f"{where} has no 'function' object (expected {{\"function\": {{\"name\": ..., "
                                  "\"arguments\": ...}}")
        if not isinstance(function.get("name"), str) or not function["name"].strip():
            raise ChatFormatError(f"{where}.function has no 'name'")
        if not isinstance(function.get("arguments"), (str, dict)):
            raise ChatFormatError(f"{where}.function.arguments must be a JSON string or an object")


def _check(messages: Sequence[dict], roles: tuple[str, ...] = ROLES) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in roles:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise ChatFormatError(f"message {i}: unknown role {role!r} (expected one of {roles})")
        content = m.get("content")
        if m["role"] != "assistant" and not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({m['role']}): content must be a string")
        if m["role"] == "assistant" and content is not None and not isinstance(content, str):
            raise ChatFormatError(f"message {i} (assistant): content must be a string")
        reasoning = m.get("reasoning_content") if m["role"] == "assistant" else None
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatFormatError(f"message {i} (assistant): reasoning_content must be a string")
        if reasoning and END_THINK in (content or ""):  # (rendered, the reply would think twice)
            raise ChatFormatError(f"message {i} (assistant): the reasoning is given twice, as reasoning_content and "
                                  f"as {THINK}...{END_THINK} in content: give it once")
        if m["role"] == "assistant" and m.get("tool_calls"):
            _check_calls(i, m["tool_calls"])
