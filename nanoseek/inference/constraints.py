"""Constrained decoding: grammars a reply must follow (JSON objects, JSON schemas, tool calls).

Grammars are written in llguidance's Lark dialect (JSON schemas embed as `%json {...}`, control
tokens as `<[id]>`) and compiled by llguidance against the tokenizer: it computes, at each step,
the set of tokens that keep the output inside the grammar. llguidance was picked over xgrammar and
outlines-core by `bench/constrained_decoding.py`: about 1 ms to compile a schema against
DeepSeek-V3's 128K vocabulary (xgrammar ~19 ms, outlines-core 90-370 ms) and 20-60 us per token,
with no torch/transformers dependency of its own.

A `Grammar` is what a request asks for; the engine gives each request its own `GrammarState`
(a matcher in the grammar's start state). A grammar may wait for a trigger token: the reply is
free until the model samples the trigger (the end of its reasoning, or the token that opens tool
calls), which is also the grammar's first token; from then on every token is masked. Tokens in
`banned` are never allowed (e.g. the tool-call opener under `tool_choice: "none"`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import llguidance
import torch

# JSON as the grammar writes it: ", " and ": " between items, no other whitespace (models that
# drift into runs of spaces or newlines inside an object cannot loop until the token budget).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}
LEADING_SPACE = r"/[ \n]{0,2}/"  # what may stand between a trigger (e.g. </think>) and the JSON


class GrammarError(ValueError):
    """A grammar or schema llguidance cannot compile (the message says where)."""


def _readable(error: str) -> str:
    """llguidance's error without the position and the listing of nanoseek's grammar that follow it
    ("at 2(9): failed to compile JSON schema: Invalid type: nosuch\n   1 | start: ...")."""
    lines = []
    for line in error.splitlines():
        if re.match(r"\s*\d+ \| ", line):
            break
        lines.append(line)
    return re.sub(r"^at \d+\(\d+\): ", "", "\n".join(lines).strip())


@lru_cache(maxsize=4)
def _vocabulary(tokenizer_json: str, n_vocab: int, eos_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(eos_ids))


def vocabulary(tokenizer_json: str, n_vocab: int, eos_ids) -> llguidance.LLTokenizer:
    """The tokenizer as llguidance sees it (tokenizer.json text; n_vocab = the model's rows,
    padding included). Cached: building it takes ~1 s for a 128K vocabulary."""
    return _vocabulary(tokenizer_json, n_vocab, tuple(sorted(eos_ids)))


def json_rule(schema: dict | None) -> str:
    """A Lark expression for one JSON value following `schema` (None: any JSON object)."""
    schema = dict(schema if schema is not None else ANY_OBJECT)
    if not isinstance(schema.get("x-guidance", {}), dict):
        raise GrammarError("the schema's 'x-guidance' must be an object")
    schema["x-guidance"] = {**JSON_LAYOUT, **schema.get("x-guidance", {})}
    return "%json " + json.dumps(bounded_numbers(closed_objects(schema)), ensure_ascii=False)


OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")  # say what other keys may be
SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")  # name -> schema
SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")  # alternatives / positions, each a whole schema


def closed_objects(node, closing: bool = True):
    """The schema with every object that declares its properties and says nothing of other keys closed to them
    (additionalProperties false), at any depth, as xgrammar (vLLM's default) and OpenAI's strict mode read a
    schema: JSON Schema allows any other key, and a small model added made-up ones (`{"answer": 19, "1 * 12": ...}`).
    Not closed: a branch of allOf (the branches describe one object together), an object whose required keys
    are not all declared."""
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: closed_objects(x) for name, x in v.items()}
        elif k in SCHEMA_LISTS + ("allOf",) and isinstance(v, list):
            out[k] = [closed_objects(x, k != "allOf") for x in v]
        elif k in ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains"):
            out[k] = closed_objects(v)
        else:
            out[k] = v
    declared = node.get("properties")
    if (closing and isinstance(declared, dict) and not any(k in node for k in OPEN_KEYS)
            and set(node.get("required") or []) <= set(declared)):
        out["additionalProperties"] = False
    return out


SAFE_INTEGER = 2**53 - 1  # the largest integer every JSON reader keeps exactly (JavaScript's Number)
INT64_MAX = 2**63 - 1  # llguidance's integers
NUMBER_STEP = 1e-10  # an unbounded number's decimals: at most 10
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const")
VALUES = ("enum", "const", "default", "examples")  # keywords whose values are JSON data, not schemas
MAX_SCHEMA_DEPTH = 128


def bounded_numbers(node, depth: int = 0):
    """The schema with every integer and number that has no bounds of its own kept within +-(2^53 - 1),
    and a number's decimals to 10 unless it has a multipleOf: an unbounded integer or number let a small
    model write digits until its budget ran out (thousands of tokens, then no JSON at all; a pydantic
    float field is an unbounded number). Bounds leave out exponents (1e5) too. A schema nested deeper than
    MAX_SCHEMA_DEPTH objects and lists is refused (deeper ones exhaust Python's and llguidance's recursion)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, list):
        return [bounded_numbers(x, depth + 1) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in VALUES else bounded_numbers(v, depth + 1) for k, v in node.items()}
    kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
    beyond = [b for b in BOUNDS[:4] if isinstance(node.get(b), (int, float)) and not -INT64_MAX - 1 <= node[b] <= INT64_MAX]
    if "integer" in kinds and beyond:  # llguidance narrows a range with both ends past int64 and breaks it
        raise GrammarError(f"an integer's {beyond[0]} ({node[beyond[0]]}) is beyond what 64 bits hold ({-INT64_MAX - 1} to {INT64_MAX})")
    if ("integer" in kinds or "number" in kinds) and not any(b in node for b in BOUNDS):
        out.update(minimum=-SAFE_INTEGER, maximum=SAFE_INTEGER)
    if "number" in kinds and not any(b in node for b in ("enum", "const", "multipleOf")):
        out["multipleOf"] = NUMBER_STEP
    return out


def literal(text: str) -> str:
    """A Lark string literal for `text`."""
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar: `lark` (rule `start`), the optional trigger token it waits for, tokens
    banned throughout, and tokens banned once a given token has been generated (the think tags
    after the reasoning's end). Build with `Grammar.compile`."""

    matcher: llguidance.LLMatcher | None  # in its start state; never advanced itself
    vocab: llguidance.LLTokenizer | None
    trigger: int | None = None
    banned: frozenset[int] = field(default_factory=frozenset)
    required: bool = False  # the reply must reach the grammar: the trigger is forced as the budget runs out
    banned_after: tuple[int, frozenset[int]] | None = None  # (token, banned once it has been generated)
    banned_before_trigger: frozenset[int] = field(default_factory=frozenset)  # in the free text before the trigger
    # (open, close): the reply may open with `open` (its reasoning) and close it with `close` once; a reply that does
    # not open with it writes neither (a model that reasoned without the opening tag left `</think>` in the answer)
    opens: tuple[int, int] | None = None

    @staticmethod
    def compile(vocab: llguidance.LLTokenizer, lark: str | None, trigger: int | None = None,
                banned=(), required: bool = False, banned_after: tuple[int, frozenset[int]] | None = None,
                banned_before_trigger=(), opens: tuple[int, int] | None = None) -> "Grammar":
        """Raises GrammarError if llguidance rejects the grammar (e.g. an invalid JSON schema)."""
        matcher = None
        if lark is not None:
            matcher = llguidance.LLMatcher(vocab, lark, log_level=0)
            if matcher.is_error():
                raise GrammarError(_readable(matcher.get_error()))
        return Grammar(matcher, vocab, trigger, frozenset(banned), required, banned_after,
                       frozenset(banned_before_trigger), opens)

    @cached_property
    def entry_path(self) -> tuple[int, ...]:
        """The tokens after the trigger to a complete grammar, the short way."""
        m = self.matcher.deep_copy()
        m.consume_token(self.trigger)
        return tuple(completion(m, self.vocab, tries=len(CLOSERS)) or ())

    @property
    def entry_cost(self) -> int:
        """Tokens from the trigger to a complete grammar, the short way (the trigger included)."""
        return 1 + len(self.entry_path)

    def start(self) -> "GrammarState":
        return GrammarState(self)


class GrammarState:
    """One request's place in its grammar."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.matcher = grammar.matcher.deep_copy() if grammar.matcher is not None else None
        self.active = grammar.trigger is None and self.matcher is not None
        self.after = False  # grammar.banned_after's token has been generated
        self.tokens = 0  # generated so far
        self.opened = None  # grammar.opens: whether the reply opened its reasoning (None: not yet known)
        self.cut_short = False  # closing() ended the output early: the budget ran out, not the reply
        self.plan: list[int] = []  # the completion closing() last found from here (see closing)
        self.costly = False  # a completion here took the costly search: closing follows its plan

    def allowed(self, n_vocab: int, device=None) -> torch.Tensor | None:
        """A bool mask [n_vocab] of the tokens allowed next, or None when every token is."""
        g = self.grammar
        banned = g.banned | (g.banned_after[1] if self.after else frozenset())
        if not self.active and g.trigger is not None:
            banned |= g.banned_before_trigger
        if g.opens is not None:  # open first or never; close once, after opening
            banned |= {g.opens[1]} if self.tokens == 0 else {g.opens[0]} if self.opened else set(g.opens)
        if not self.active and not banned:
            return None
        if self.active:
            words = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)
            self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
            self._check()
            mask = unpack_bits(words, n_vocab)
        else:
            mask = torch.ones(n_vocab, dtype=torch.bool)
        if banned:
            mask[list(banned)] = False
        return mask.to(device) if device is not None else mask

    def consume(self, token: int) -> None:
        g = self.grammar
        if g.banned_after is not None and token == g.banned_after[0]:
            self.after = True
        if g.opens is not None:
            self.opened = (token == g.opens[0]) if self.tokens == 0 else self.opened and token != g.opens[1]
        self.tokens += 1
        if not self.active and self.matcher is not None and token == self.grammar.trigger:
            self.active = True
        if self.active and not self.matcher.is_stopped():
            self.matcher.consume_token(token)
            self._check()

    def _check(self) -> None:
        """Raise if the matcher failed: a schema no finite reply satisfies (a required property that holds
        its own type) runs into llguidance's limits and leaves only the end of the reply allowed."""
        if self.matcher.is_error():
            error = self.matcher.get_error().splitlines()[0]
            raise GrammarError(f"the reply cannot follow the grammar: {error}")

    def closing(self, budget: int, proposed: int) -> int:
        """The token to emit with `budget` tokens left, given the sampled one: `proposed` if a
        completion of the grammar still fits in the budget after it, else the next token of the
        shortest completion found (so the output parses when the budget runs out). The completion
        last found is kept (`plan`): a later search, a heuristic, may find only a longer way, and then
        the kept one is followed; one that took the costly search is followed to the end."""
        g = self.grammar
        if budget > CLOSE_WITHIN or self.matcher is None or self.matcher.is_stopped():
            return proposed
        if not self.active:  # a required grammar not entered yet: enter it while it still fits
            if g.required and proposed != g.trigger and g.entry_cost >= budget:
                self.cut_short, self.plan = True, list(g.entry_path)
                return g.trigger
            return proposed
        if self.plan and self.matcher.validate_tokens(self.plan[:1]) != 1:
            self.plan = []  # (not where it was found)
        if self.costly and self.plan and len(self.plan) < budget and _state_after(self.matcher, proposed) == _state(self.matcher):
            return proposed  # a token that leaves the matcher where it was (`0` in an e-mail's name): the same way out
        if not (self.costly and self.plan):
            after = self.matcher.deep_copy()
            if after.consume_token(proposed):
                rest, costly = _search(after, g.vocab, 1)
                self.costly |= costly
                if rest is not None and len(rest) < budget:
                    self.plan = rest
                    return proposed
            path, costly = _search(self.matcher, g.vocab, len(CLOSERS))
            self.costly |= costly
            if path and (not self.plan or len(path) <= len(self.plan)):
                self.plan = path
        if not self.plan:
            return proposed
        token = self.plan.pop(0)
        self.cut_short |= token != proposed
        return token

    @property
    def finished(self) -> bool:
        """The grammar is complete and takes no more tokens: the reply ends here."""
        return self.active and self.matcher.is_stopped()


CLOSE_WITHIN = 48  # completions are searched for only when this few tokens are left
CLOSERS = '"}]0'  # preferred when completing: close strings, objects, arrays; the shortest number


@lru_cache(maxsize=4)
def closing_order(vocab: llguidance.LLTokenizer) -> torch.Tensor:
    """Token ids in the order a completion tries them: the closers, then by text length (control
    tokens count as one)."""
    lengths = [len(vocab.decode_bytes([t])) or 1 for t in range(vocab.vocab_size)]
    first = {vocab.tokenize_str(c)[0]: i for i, c in enumerate(CLOSERS)}
    return torch.tensor(sorted(range(vocab.vocab_size), key=lambda t: (first.get(t, len(CLOSERS)), lengths[t])))


def _allowed_in_order(m: llguidance.LLMatcher, vocab: llguidance.LLTokenizer) -> torch.Tensor:
    order = closing_order(vocab)
    words = torch.zeros((vocab.vocab_size + 31) // 32, dtype=torch.int32)
    m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
    return order[unpack_bits(words, vocab.vocab_size)[order]]


LOOKAHEAD = 4  # allowed tokens checked at each step for one that completes the grammar at once
SCAN = 32  # allowed tokens checked at each step for one that leads somewhere new (see completion)
MAX_CHECKS = 128  # such checks in one completion at most (each computes a mask: ~4 ms for an e-mail address's grammar)


def completion(matcher: llguidance.LLMatcher, vocab: llguidance.LLTokenizer, tries: int = 1) -> list[int] | None:
    """A short sequence of tokens that takes `matcher` to an accepting state, or None if none is
    found within CLOSE_WITHIN tokens: forced tokens where the grammar forces them, else of the first
    few allowed in `closing_order` one that completes the grammar at once, or the first. With
    tries > 1 the first free step tries that many candidates, and the one that leads somewhere new
    (below), and keeps the shortest completion. Where that finds none, the search is made again preferring, at each step, a token that leads to a
    state not met before on the way (told apart by what each allows next): a pattern such as an e-mail
    address looped on its first allowed character (`0000...`) and never reached its `@`. (Preferred
    always, it filled arrays and took detours through strings whose masks repeat.)"""
    return _search(matcher, vocab, tries)[0]


def _search(matcher: llguidance.LLMatcher, vocab: llguidance.LLTokenizer, tries: int) -> tuple[list[int] | None, bool]:
    """`completion`, and whether it took the second search (the one preferring new states)."""
    path = _complete(matcher, vocab, tries, novel=False)
    return (path, False) if path is not None else (_complete(matcher, vocab, tries, novel=True), True)


def _complete(matcher: llguidance.LLMatcher, vocab: llguidance.LLTokenizer, tries: int, novel: bool) -> list[int] | None:
    m, path = matcher.deep_copy(), []
    scan = novel or tries > 1  # (the first free step of a search with tries: its candidates include the new way)
    here = _state(m) if scan else b""
    seen, stuck, checks = {here}, set(), 0  # states met on the way; states whose next SCAN tokens lead nowhere new
    while not m.is_accepting():
        if len(path) >= CLOSE_WITHIN or m.is_error():
            return None
        step = m.compute_ff_tokens()
        if not step:
            allowed = _allowed_in_order(m, vocab)[:SCAN if scan else LOOKAHEAD].tolist()
            if not allowed:
                return None
            new = None
            if scan and here not in stuck and checks < MAX_CHECKS:
                for new in allowed:
                    checks += 1
                    if _state_after(m, new) not in seen:
                        break
                else:  # (a string of a minimum length: every character leads to the same mask)
                    new = None
                    stuck.add(here)
            if tries > 1:
                firsts = allowed[:tries] + ([new] if new is not None and new not in allowed[:tries] else [])
                options = [[t] + rest for t in firsts if (rest := _rest_after(m, vocab, t)) is not None]
                return min((path + o for o in options), key=len, default=None)
            done = next((t for t in allowed[:LOOKAHEAD] if _rest_after(m, vocab, t, depth=0) == []), None)
            step = [done if done is not None else new if new is not None else allowed[0]]  # (token 0 is a token)
        m.consume_tokens(step)
        if scan:
            here = _state(m)
            seen.add(here)
        path += step
    return path


def _state(m: llguidance.LLMatcher) -> bytes:
    """What the matcher allows next (its mask) and whether it may stop: the same for the same state."""
    return bytes([m.is_accepting()]) + m.compute_bitmask()


def _state_after(m: llguidance.LLMatcher, token: int) -> bytes | None:
    if not m.consume_token(token):
        return None
    state = _state(m)
    m.rollback(1)
    return state


def _rest_after(m: llguidance.LLMatcher, vocab: llguidance.LLTokenizer, token: int, depth: int = 1) -> list[int] | None:
    """The completion after `token` ([] if the grammar accepts right after it; with depth=0 only
    that is checked, anything else is None)."""
    after = m.deep_copy()
    if not after.consume_token(token):
        return None
    if after.is_accepting():
        return []
    return completion(after, vocab) if depth else None


_BITS = torch.arange(32, dtype=torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """llguidance's bitmask (int32 words, bit i of word w = token 32w + i) -> bool [n]."""
    return ((words.unsqueeze(-1) >> _BITS) & 1).flatten()[:n].bool()
