"""Function calling: the call format read from each DeepSeek chat template, the grammar of calls,
parsing and streaming a reply's calls, and the AST calculator."""

import ast
import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch
import trl
from tokenizers import Tokenizer

from conftest import randomize_
from nanoseek import tools
from nanoseek.inference import Engine, SamplingParams
from nanoseek.inference.constraints import Grammar, vocabulary
from nanoseek.model import build_model, get_preset
from nanoseek.tokenizer import DeepSeekTokenizer
from nanoseek.tools import CALCULATOR, CallFormat, CallStream, calculate, run_calculator
from test_chat_templates import NAMES, folders  # noqa: F401  (fixture)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city", "unit"], "additionalProperties": False,
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]},
                   "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}}}}}
CALLS = [("get_weather", '{"city": "Hangzhou", "unit": "c"}'), ("calculator", '{"expression": "17 * 23"}')]
WITH_CALLS = {"deepseek-v3", "deepseek-v3.1", "deepseek-r1", "deepseek-r1-distill-qwen", "deepseek-r1-distill-llama"}


@pytest.fixture(scope="module")
def formats(folders):  # noqa: F811
    return {n: (DeepSeekTokenizer.load(folders[n]), CallFormat.probe(DeepSeekTokenizer.load(folders[n]))) for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_probe_reads_each_templates_format(formats, name):
    tok, fmt = formats[name]
    if name not in WITH_CALLS:  # V2-Lite-Chat's template has no tool calls
        assert fmt is None
        return
    assert fmt.begin == "<｜tool▁calls▁begin｜>" and fmt.end == "<｜tool▁calls▁end｜>"
    # the format renders calls exactly as the template renders them in a conversation's history
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}} for i, (n, a) in enumerate(CALLS)]
    user = {"role": "user", "content": "x"}
    whole = tok.apply_chat_template([user, {"role": "assistant", "content": None, "tool_calls": calls}],
                                    add_generation_prompt=False)
    assert fmt.render(CALLS) in whole


@pytest.mark.parametrize("name", sorted(WITH_CALLS))
def test_split_and_stream_agree_at_every_cut(formats, name):
    _, fmt = formats[name]
    text = "Let me look.\n" + fmt.render(CALLS)
    content, calls, complete = fmt.split(text)
    assert complete and content == "Let me look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == CALLS
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 6)) + [len(text)]
        stream, got_content, got = CallStream(fmt), "", {}
        for i, cut in enumerate(cuts):
            piece, deltas = stream.feed(text[:cut], final=i == len(cuts) - 1)
            got_content += piece
            for d in deltas:
                entry = got.setdefault(d["index"], {"name": None, "arguments": ""})
                if "id" in d:
                    assert entry["name"] is None and d["type"] == "function"
                    entry["name"] = d["function"]["name"]
                entry["arguments"] += d["function"]["arguments"]
        assert got_content.rstrip() == "Let me look."
        assert [(got[i]["name"], got[i]["arguments"]) for i in sorted(got)] == CALLS


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1"])  # calls closed by several characters (a code fence)
def test_a_streamed_call_cut_inside_its_close_keeps_its_arguments_alone(formats, name):
    """A reply cut by max_tokens inside a call's close: the streamed arguments ended with its start ('\n``')."""
    _, fmt = formats[name]
    text = fmt.render(CALLS[:1])
    close = text.index(fmt.after)
    for cut in range(close, close + len(fmt.after)):
        args = "".join(d["function"]["arguments"] for d in CallStream(fmt).feed(text[:cut], final=True)[1])
        assert args == CALLS[0][1], (cut, args)


def test_cut_short_block_keeps_complete_calls(formats):
    _, fmt = formats["deepseek-v3"]
    text = fmt.render(CALLS)
    content, calls, complete = fmt.split(text[: text.find("calculator") + 5])
    assert content == "" and len(calls) == 1 and not complete


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v3.1"])
def test_random_model_under_the_call_grammar_writes_valid_calls(formats, name):
    tok, fmt = formats[name]
    torch.manual_seed(0)
    V = 129280
    cfg = get_preset("tiny", vocab_size=V, eos_token_id=tok.eos_id)
    model = build_model(cfg).eval()
    randomize_(model, std=0.05)
    engine = Engine(model, decode=tok.decode, max_batch=3)
    grammar = Grammar.compile(vocabulary(tok.tok.to_str(), V, tok.eos_ids), fmt.grammar([WEATHER, CALCULATOR], tok))
    prompt = tok.encode("<｜User｜>weather?<｜Assistant｜>")
    params = [SamplingParams(max_new_tokens=120, temperature=t, seed=s, grammar=grammar) for t, s in ((0, None), (1, 1), (1, 2))]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CALCULATOR)}
    for req in engine.generate([prompt] * 3, params):
        assert req.finish_reason == ("length" if len(req.tokens) == 120 else "stop"), req.text  # closed by the budget
        content, calls, complete = fmt.split(req.text)
        assert content == "" and complete and calls
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), schemas[c["function"]["name"]])


def test_calculator():
    assert calculate("17 * 23") == 391
    assert calculate("(2 + 3) ** 2 - 7 // 2") == 22
    assert calculate("1 / 4") == 0.25 and calculate("6 / 3") == 2
    assert calculate("2^10") == 1024 and calculate("-3 × 4") == -12
    assert calculate("123456789 * 987654321") == 121932631112635269
    for bad in ("__import__('os')", "x + 1", "(1).real", "[1, 2]", "9 ** 9 ** 9", "1 / 0", "'a' * 3", "",
                "-" * 5000 + "1", "(" * 300 + "1" + ")" * 300, "(-8) ** 0.5", "1e308 * 10", "2.0 ** 5000", "1e999"):
        with pytest.raises(ValueError):
            calculate(bad)
    assert run_calculator('{"expression": "40 + 2"}') == "42"
    assert run_calculator('{"expression": "1/0"}').startswith("error")
    assert run_calculator("not json").startswith("error")
    # errors the model can act on, never Python's internals ("error: 'expression'", "not BinOp")
    for args, says in (('{"expr": "1+1"}', 'need an "expression"'), ("[1]", 'need an "expression"'),
                       ('{"expression": "1 << 5"}', "not '1 << 5'"), ('{"expression": "x + 1"}', "not 'x'"),
                       ("{", "not JSON"), ("[" * 5000 + "]" * 5000, "not JSON"),
                       ('{"expression": ' + "9" * 5000 + "}", "not JSON")):  # JSON that Python cannot read
        assert run_calculator(args).startswith("error: ") and says in run_calculator(args), run_calculator(args)
    jsonschema.Draft202012Validator.check_schema(CALCULATOR["function"]["parameters"])


def test_calculator_refuses_a_growing_product_early(monkeypatch):
    """Each factor is small, the product is not (quadratic time): refused at the first partial product that is
    too large, not after all 399 multiplications."""
    products = []
    monkeypatch.setitem(tools._OPS, ast.Mult, lambda a, b: products.append(1) or a * b)
    with pytest.raises(ValueError, match="too large"):
        calculate("*".join(["9**1000"] * 400))
    assert len(products) == 1


def test_calculator_refuses_a_result_too_small_to_hold_as_it_refuses_one_too_large():
    """Found by a user: 10**-400 gave "0" where 10.0**400 gave an error."""
    for expression in ("10**-400", "2**-1074/2", "1e-200 * 1e-200", "2**-99999"):  # (not "too large")
        with pytest.raises(ValueError, match="too small"):
            calculate(expression)
    assert calculate("0 * 1e-300") == 0 and calculate("0**2") == 0 and calculate("1e-300 * 1e-5") == pytest.approx(1e-305)


def test_calls_take_the_declared_arguments_only_unless_the_schema_allows_more():
    """A schema that declares its arguments and says nothing of others: calls carry those only (a model
    added made-up keys, which JSON Schema allows by default); said otherwise, as given; none declared, none."""
    from nanoseek.inference.constraints import closed_objects

    declared = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert closed_objects(tools.declared_arguments(declared)) == {**declared, "additionalProperties": False}
    loose = {**declared, "additionalProperties": True}
    assert closed_objects(tools.declared_arguments(loose)) == loose
    none = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: no parameters, no arguments
    assert tools.declared_arguments(None) == tools.declared_arguments({}) == none
    assert tools.declared_arguments({"type": "object", "description": "no arguments"}) == none
    assert tools.declared_arguments({"type": "object", "additionalProperties": True}) == {"type": "object", "additionalProperties": True}
    assert tools.declared_arguments({"anyOf": [declared, loose]}) == {"anyOf": [declared, loose]}


TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"  # the chat templates of the models TRL trains
TRANSFORMERS_STYLE = {  # template -> (before, between, after, single): calls as transformers' convention writes them
    "qwen2_5": ('<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>", False),
    "qwen3": ('<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>", False),
    "llama3_1": ('{"name": "', '", "parameters": ', "}", True),
}
MARKERS = ["<tool_call>", "</tool_call>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_STYLE))
def test_probe_reads_templates_that_take_calls_as_transformers_writes_them(folders, name):  # noqa: F811
    """Qwen's and Llama's templates write `arguments | tojson` (an OpenAI JSON string came out quoted, and the probe
    found no format: every request with tools to such a model was refused) and Llama 3.1's renders one call a turn:
    each turn of calls is given the shape its template takes, and Llama's format calls once a turn."""
    template = TRL_TEMPLATES / f"{name}.jinja"
    if not template.exists():
        pytest.skip(f"this trl has no {template.name}")
    vocabulary = Tokenizer.from_str(DeepSeekTokenizer.load(folders["deepseek-v3"]).tok.to_str())
    vocabulary.add_special_tokens(MARKERS)  # (DeepSeek's vocabulary with the control tokens these templates write)
    eos = "<|eot_id|>" if name.startswith("llama") else "<|im_end|>"
    tok = DeepSeekTokenizer(vocabulary, {"eos_token": eos, "chat_template": template.read_text()})
    fmt = CallFormat.probe(tok)
    assert (fmt.before, fmt.between, fmt.after, fmt.single) == TRANSFORMERS_STYLE[name]
    calls = [{"id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": CALLS[0][1]}}]
    text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                                       "tool_calls": calls}], add_generation_prompt=False)
    assert fmt.render(CALLS[:1]) in text and "\\\"" not in text  # the arguments written once, as JSON


def test_a_turn_of_calls_gets_the_content_its_template_reads(folders):  # noqa: F811
    """A template that reads an assistant turn's content as text (Qwen3's `'</think>' in message.content`) gets "" for
    a turn of calls without content; DeepSeek's, which tell such a turn by its content None, keep None."""
    base = DeepSeekTokenizer.load(folders["deepseek-v3"])
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% if '</think>' in m.content %}T{% endif %}"
                "{% for c in m.tool_calls %}[{{ c.function.name }} {{ c.function.arguments }}]{% endfor %}"
                "{% else %}{{ m.content }}{% endif %}{% endfor %}{{ {'é': 1} | tojson(ensure_ascii=False) }}")
    tok = DeepSeekTokenizer(base.tok, {**base.config, "chat_template": template})
    assert tok.call_shape == (True, False) and base.call_shape == (False, False)
    calls = [{"id": "c0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": calls}]
    assert tok.apply_chat_template(turns, add_generation_prompt=False) == 'x[f {"a": 1}]{"é": 1}'
    assert '[f {"a": 1}]' in CallFormat.probe(tok).render([("f", '{"a": 1}')])  # (None: no call format, no tools)


def test_a_served_qwen_style_model_calls_tools_and_takes_its_calls_back(tmp_path):
    """End to end through the server: a tiny random Qwen2 model with Qwen2.5's template (its tool-call markers as
    control tokens) answers tool_choice "required" with a call the client parses, and takes that call back in its
    history as OpenAI sends it (content null, arguments a JSON string)."""
    import openai

    from conftest import tiny_gqa_config
    from nanoseek.serve.server import create_app
    from test_server import LiveServer

    template = TRL_TEMPLATES / "qwen2_5.jinja"
    if not template.exists():
        pytest.skip("this trl has no qwen2_5.jinja")
    vocabulary = DeepSeekTokenizer.train(["What is the weather in Hangzhou? " * 3, '{"city": "x", "unit": "c"}'] * 20,
                                         vocab_size=300).tok
    vocabulary.add_special_tokens(MARKERS)
    tok = DeepSeekTokenizer(vocabulary, {"eos_token": "<|im_end|>", "chat_template": template.read_text()})
    torch.manual_seed(0)
    model = build_model(tiny_gqa_config(vocab_size=tok.vocab_size, max_position_embeddings=2048)).eval()
    engine = Engine(model, decode=tok.decode, max_batch=2, max_len=2048, eos_token_id=tok.eos_id)
    with LiveServer(create_app(engine, tok, name="qwen-tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        ask = [{"role": "user", "content": "What is the weather in Hangzhou?"}]
        r = client.chat.completions.create(model="qwen-tiny", messages=ask, tools=[WEATHER], tool_choice="required",
                                           max_tokens=200, temperature=0, extra_body={"thinking": {"type": "disabled"}})
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        history = ask + [r.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
        again = client.chat.completions.create(model="qwen-tiny", messages=history, tools=[WEATHER], max_tokens=2)
        assert again.choices[0].finish_reason in ("length", "stop", "tool_calls")
