"""Constrained decoding through llguidance: JSON objects, JSON schemas, triggers and banned tokens,
with a random model (which would write anything) over the shipped tokenizer."""

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from conftest import randomize_
from nanoseek.inference import Engine, SamplingParams
from nanoseek.inference.constraints import Grammar, GrammarError, closed_objects, json_rule, unpack_bits, vocabulary
from nanoseek.model import build_model, get_preset, padded_vocab
from nanoseek.tokenizer import DeepSeekTokenizer

SHIPPED = Path(__file__).parents[1] / "nanoseek" / "assets" / "model"
V = padded_vocab(DeepSeekTokenizer.load(SHIPPED).vocab_size)  # the model's rows for the shipped tokenizer
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "size", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"},
                         "size": {"type": "string", "enum": ["small", "large"]},
                         "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                         "where": {"type": "object", "required": ["x"], "additionalProperties": False,
                                   "properties": {"x": {"type": "number"}}}}}


@pytest.fixture(scope="module")
def setup():
    tok = DeepSeekTokenizer.load(SHIPPED)
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=V, eos_token_id=tok.eos_id)).eval()
    randomize_(model, std=0.1)
    engine = Engine(model, decode=tok.decode, max_batch=4)
    return tok, engine, vocabulary(tok.tok.to_str(), V, tok.eos_ids)


def params(grammar, n=3, max_new=160):
    return [SamplingParams(max_new_tokens=max_new, temperature=t, seed=s, grammar=grammar)
            for t, s in ((0.0, None), (1.0, 1), (1.5, 2))[:n]]


def test_json_schema_output_always_parses_and_validates(setup):
    """A random model writes anything the grammar allows; as its budget runs out the reply is
    completed the short way, so it still validates, and says "length": the budget ended it, not the
    model (a client can tell a string or a tool call's arguments were cut)."""
    tok, engine, vocab = setup
    g = Grammar.compile(vocab, "start: " + json_rule(SCHEMA))
    reasons = []
    for max_new in (40, 160):
        for req in engine.generate([tok.encode("<｜User｜>give me json<｜Assistant｜>")] * 3, params(g, max_new=max_new)):
            reasons.append(req.finish_reason)
            assert req.finish_reason == ("length" if len(req.tokens) == max_new else "stop"), req.text
            jsonschema.validate(json.loads(req.text), SCHEMA)
            assert "  " not in req.text and "\n" not in req.text  # bounded whitespace: ", " and ": " only
    assert {"stop", "length"} <= set(reasons)  # both kinds of ending were seen


def test_objects_hold_only_the_keys_their_schema_declares_unless_it_allows_more(setup):
    """JSON Schema allows any other key in an object; the shipped model, given a strict schema, added one
    ({"answer": -129163, "kind": "add", "1 * 12 + 73": "12 * 12 * 13"}). Closed at every depth, as xgrammar
    (vLLM's default) and OpenAI's strict mode read a schema; a schema that says otherwise is left as it is."""
    tok, engine, vocab = setup
    inner = {"type": "object", "properties": {"b": {"type": "boolean"}}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "inner": inner,
                                               "list": {"type": "array", "items": inner, "maxItems": 2}}}
    g = Grammar.compile(vocab, "start: " + json_rule(schema))
    prompts = [tok.encode("<｜User｜>give me json<｜Assistant｜>")] * 6
    replies = engine.generate(prompts, [SamplingParams(max_new_tokens=80, temperature=1.5, seed=i, grammar=g)
                                        for i in range(6)])

    def keys(value):
        if isinstance(value, dict):
            return set(value) | set().union(*map(keys, value.values()))
        return set().union(*map(keys, value)) if isinstance(value, list) else set()
    assert all(keys(json.loads(r.text)) <= {"a", "inner", "list", "b"} for r in replies), [r.text for r in replies]
    assert any(json.loads(r.text) for r in replies)  # (not six empty objects)
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema and "additionalProperties" not in inner  # the caller's schema is not changed
    for left in ({**inner, "additionalProperties": True}, {**inner, "patternProperties": {"^x": {}}},
                 {**inner, "required": ["b", "c"]}, {"type": "object"}):
        assert closed_objects(left) == left
    together = {"allOf": [inner, {"properties": {"c": {"type": "integer"}}}]}  # branches describe one object
    assert closed_objects(together) == together
    assert closed_objects({"anyOf": [inner, {"$ref": "#/$defs/x"}], "$defs": {"x": inner}}) == {
        "anyOf": [{**inner, "additionalProperties": False}, {"$ref": "#/$defs/x"}],
        "$defs": {"x": {**inner, "additionalProperties": False}}}


@pytest.mark.parametrize("string", [{"pattern": "^[a-z0-9]+@x\\.com$"}, {"format": "email"}, {"pattern": "^[0-9]+X$"},
                                    {"format": "uuid", "minLength": 36}])
def test_a_patterned_string_is_completed_when_the_budget_runs_out(setup, string):
    """A model that would write one allowed character forever (here: biased to `0`) inside a string with a
    pattern or format: as the budget runs out the string is completed into one that matches (the search
    looped on `0` and never reached the `@`, so the reply, or a tool call in it, was lost)."""
    tok, engine, vocab = setup
    schema = {"type": "object", "properties": {"to": {"type": "string", **string}}, "required": ["to"],
              "additionalProperties": True}  # (open: a uuid's string ends, and then the model writes more keys)
    g = Grammar.compile(vocab, "start: " + json_rule(schema))
    zero = tok.encode("0")
    assert len(zero) == 1
    for max_new in (50, 80):  # (a uuid's shortest reply takes 43)
        req = engine.generate([tok.encode("<｜User｜>mail<｜Assistant｜>")], [SamplingParams(
            max_new_tokens=max_new, temperature=0, grammar=g, logit_bias=((zero[0], 100.0),))])[0]
        assert req.finish_reason == "length" and len(req.tokens) <= max_new, req.text
        jsonschema.validate(json.loads(req.text), schema, format_checker=jsonschema.FormatChecker())
        assert req.text.count("0") >= 20, req.text  # the model's own text, until the budget had to close it


def test_budget_completion_keeps_the_shortest_way_found_and_works_after_thinking(setup):
    """As the budget runs out the completion found is kept: a later search may only find a longer way (an
    array filled with `""` instead of `[]`: a reply one token short of parsing). A reply that reasons first
    enters its JSON in time and completes it, a patterned string too (date-times ended one token short)."""
    tok, engine, vocab = setup
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
              "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}, "ok": {"type": "boolean"},
              "score": {"type": "number"}}, "required": ["name", "age", "tags", "ok", "score"], "additionalProperties": False}
    g = Grammar.compile(vocab, "start: " + json_rule(schema))
    for seed in range(3):
        req = engine.generate([tok.encode("<｜User｜>json<｜Assistant｜>")], [SamplingParams(
            max_new_tokens=36, temperature=1.0, seed=seed, grammar=g)])[0]
        jsonschema.validate(json.loads(req.text), schema)
    end = tok.end_think_id
    for string in ({"format": "date-time"}, {"format": "email"}):
        schema = {"type": "object", "properties": {"d": {"type": "string", **string}}, "required": ["d"]}
        g = Grammar.compile(vocab, f"start: <[{end}]> " + json_rule(schema), trigger=end, required=True)
        for max_new, seed in ((46, 0), (54, 1), (60, 0)):
            req = engine.generate([tok.encode("<｜User｜>mail<｜Assistant｜><think>\n")], [SamplingParams(
                max_new_tokens=max_new, temperature=1.0, seed=seed, grammar=g)])[0]
            answer = req.text.split("</think>", 1)[1]
            jsonschema.validate(json.loads(answer), schema, format_checker=jsonschema.FormatChecker())


def test_json_object_mode_parses_at_any_budget(setup):
    tok, engine, vocab = setup
    g = Grammar.compile(vocab, "start: " + json_rule(None))
    for max_new in (3, 8, 40):
        for req in engine.generate([tok.encode("<｜User｜>json please<｜Assistant｜>")] * 3, params(g, max_new=max_new)):
            assert isinstance(json.loads(req.text), dict) and len(req.tokens) <= max_new, (max_new, req.text)


@pytest.mark.parametrize("kind", ["integer", "number"])
def test_a_number_without_bounds_ends_within_what_json_readers_keep(setup, kind):
    """A model that would write 9s forever (here: biased to) closes an unbounded integer or number after
    15 digits (it wrote digits until its budget ran out), a number's decimals after 10; bounds of the
    schema's own, and values, are left alone."""
    from nanoseek.inference.constraints import NUMBER_STEP, SAFE_INTEGER, bounded_numbers

    tok, engine, vocab = setup
    schema = {"type": "object", "properties": {"v": {"type": kind}}, "required": ["v"], "additionalProperties": False}
    g = Grammar.compile(vocab, "start: " + json_rule(schema))
    for bias in ("9", ".9"):  # 9s forever; for a number, decimals forever too
        ids = tok.encode(bias)
        req = engine.generate([tok.encode("<｜User｜>a number<｜Assistant｜>")], [SamplingParams(
            max_new_tokens=200, temperature=0, grammar=g, logit_bias=tuple((t, 100.0 - 10 * i) for i, t in enumerate(ids)))])[0]
        assert req.finish_reason == "stop" and abs(json.loads(req.text)["v"]) <= SAFE_INTEGER, req.text
        whole, _, decimals = req.text.removeprefix('{"v": ').removesuffix("}").lstrip("-").partition(".")
        assert (whole, decimals) == ("9" * 15, "") or (kind, bias, whole, decimals) == ("number", ".9", "9", "9" * 10), req.text
    own = {"type": "object", "default": {"type": "integer"}, "properties": {
        "a": {"type": ["integer", "null"]}, "b": {"type": "integer", "maximum": 10**17},
        "c": {"type": "integer", "enum": [10**20]}, "d": {"type": "array", "items": {"type": "integer"}},
        "e": {"type": "number"}, "f": {"type": "number", "multipleOf": 0.5}}}
    got = bounded_numbers(own)
    assert got["properties"]["a"]["maximum"] == got["properties"]["d"]["items"]["maximum"] == SAFE_INTEGER
    assert got["properties"]["b"] == own["properties"]["b"] and got["properties"]["c"] == own["properties"]["c"]
    assert got["properties"]["e"] == {"type": "number", "minimum": -SAFE_INTEGER, "maximum": SAFE_INTEGER,
                                      "multipleOf": NUMBER_STEP}
    assert got["properties"]["f"]["multipleOf"] == 0.5 and "multipleOf" not in got["properties"]["a"]
    assert got["default"] == {"type": "integer"} and "maximum" not in own["properties"]["a"]  # not changed in place
    long = {"type": "integer", "minimum": -2**63, "maximum": 2**63 - 1}  # a Java long, an i64: the whole range
    assert bounded_numbers(long) == long
    with pytest.raises(GrammarError, match="64 bits"):
        bounded_numbers({"type": "integer", "maximum": 2**63})


def test_budget_too_small_ends_with_length(setup):
    tok, engine, vocab = setup
    g = Grammar.compile(vocab, "start: " + json_rule(SCHEMA))
    req = engine.generate([tok.encode("hi")], [SamplingParams(max_new_tokens=4, grammar=g)])[0]
    assert req.finish_reason == "length" and len(req.tokens) == 4


def test_trigger_frees_the_reply_until_the_token_then_constrains(setup):
    tok, engine, vocab = setup
    end = tok.end_think_id
    g = Grammar.compile(vocab, f"start: <[{end}]> " + json_rule(None), trigger=end)
    state = g.start()
    assert state.allowed(V) is None  # free before the trigger
    for t in tok.encode("thinking about it"):
        state.consume(t)
    state.consume(end)
    allowed = state.allowed(V)
    assert allowed.sum() > 0 and all(allowed[t] for t in tok.encode("{"))
    assert not allowed[tok.encode("x")[0]]
    # through the engine: a random model that is made to write </think> then answers in JSON
    prompt = tok.encode("<｜User｜>q<｜Assistant｜><think>\n")
    forced = Grammar.compile(vocab, f"start: /[a-z ]{{0,5}}/ <[{end}]> " + json_rule(None))
    for req in engine.generate([prompt] * 2, params(forced, n=2)):
        head, _, answer = req.text.partition("</think>")
        assert json.loads(answer) is not None and len(head) <= 5


def test_banned_tokens_never_appear(setup):
    tok, engine, vocab = setup
    banned = set(range(100, V))
    g = Grammar.compile(vocab, None, banned=banned)
    for req in engine.generate([tok.encode("hi")] * 3, params(g, max_new=30)):
        assert not banned & set(req.tokens)


def test_bad_schema_is_a_grammar_error(setup):
    _, _, vocab = setup
    with pytest.raises(GrammarError):
        Grammar.compile(vocab, "start: " + json_rule({"type": "object", "properties": {"a": {"type": "nosuch"}}}))


def test_unpack_bits():
    words = torch.tensor([0b101, -(2**31)], dtype=torch.int32)
    mask = unpack_bits(words, 64)
    assert mask.nonzero().flatten().tolist() == [0, 2, 63]
