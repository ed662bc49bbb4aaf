"""The built-in tools of the web app and the terminal chat: the /api/tools routes, and the terminal
chat's tool rounds (call, calculator, result fed back, final answer) with a model that calls tools.

That model is a tiny random DeepSeek-V3 over DeepSeek-V3's real tokenizer and V3.1's chat template,
biased to open a block of tool calls whenever it may (the grammar then keeps the call valid)."""

import io
import json
import re

import pytest
import torch
from fastapi.testclient import TestClient
from rich.console import Console

from conftest import randomize_
from nanoseek.chat import MAX_TOOL_ROUNDS, Tools, reply
from nanoseek.data.builtin import task_texts
from nanoseek.inference import Engine, SamplingParams
from nanoseek.model import build_model, get_preset
from nanoseek.serve import create_app
from nanoseek.serve.store import ChatStore
from nanoseek.tokenizer import DeepSeekTokenizer
from nanoseek.tools import CALCULATOR, run_calculator
from test_chat_templates import model_folder
from test_server import biased
from test_store import TOOL_ROUND

KEY = "tools-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPENER = "<｜tool▁calls▁begin｜>"


def tool_calling_model(folder):
    """(model, tokenizer): V3.1's template and tokenizer, the model biased to open tool calls, to close
    a string as soon as it may and to end a block after one call (so its calls end before a budget of
    30 tokens does: a call the budget closes is not run)."""
    tok = DeepSeekTokenizer.load(model_folder(folder, "deepseek-v3.1"))
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=129280, eos_token_id=tok.eos_id,
                                   max_position_embeddings=2048)).eval()
    randomize_(model, std=0.05)
    (opener,), (quote,), (end,) = tok.encode(OPENER), tok.encode('"'), tok.encode("<｜tool▁calls▁end｜>")
    return biased(model, opener, quote, end), tok


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    return tool_calling_model(tmp_path_factory.mktemp("v31"))


def test_tool_routes(caller):
    model, tok = caller
    engine = Engine(model, decode=tok.decode, max_batch=1, max_len=1024, eos_token_id=tok.eos_id)
    web = TestClient(create_app(engine, tok, api_key=KEY))  # no lifespan: these routes never use the engine
    assert web.get("/api/tools", headers=AUTH).json() == {"data": [CALCULATOR]}
    short = Engine(model, decode=tok.decode, max_batch=1, max_len=256, eos_token_id=tok.eos_id)
    assert TestClient(create_app(short, tok, api_key=KEY)).get("/api/tools", headers=AUTH).json() == {"data": []}
    # (describing the calculator would take over a quarter of a 256-token context)

    def run(arguments, name="calculator", **kw):
        return web.post(f"/api/tools/{name}", json={"arguments": arguments}, **{"headers": AUTH, **kw})

    assert run(json.dumps({"expression": "17 * 23 + 2 ** 10"})).json() == {"content": "1415"}
    for bad in ("not json", "{}", '{"expression": "__import__(\'os\').system(\'true\')"}', '{"expression": "1/0"}',
                json.dumps({"expression": "-" * 5000 + "1"})):  # the last: deeper than Python's recursion limit
        r = run(bad)
        assert r.status_code == 200 and r.json()["content"].startswith("error"), (bad[:40], r.text)
    missing = run("{}", name="shell")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    for body in ({}, {"arguments": {"expression": "1"}}, {"arguments": "x" * 20_000}):
        r = web.post("/api/tools/calculator", json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", body
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert web.get("/api/tools", headers=headers).status_code == 401
        r = run("{}", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_no_tools_for_a_template_without_calls_and_stored_tool_fields_checked(tmp_path):
    trained = DeepSeekTokenizer.train(list(task_texts(100)), vocab_size=300)
    no_calls = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"  # V2-Chat-like
    tok = DeepSeekTokenizer(trained.tok, {**trained.config, "chat_template": no_calls})
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)).eval()
    engine = Engine(model, decode=tok.decode, max_batch=1, max_len=64, eos_token_id=tok.eos_id)
    web = TestClient(create_app(engine, tok, store=ChatStore(tmp_path / "chats.db")), base_url="http://localhost")
    assert web.get("/api/tools").json() == {"data": []}
    assert Tools.offer(engine, tok) is None
    cid = web.post("/api/conversations", json={}).json()["id"]
    put = lambda msgs: web.put(f"/api/conversations/{cid}/messages", json={"messages": msgs})  # noqa: E731
    assert put(TOOL_ROUND).json()["messages"] == TOOL_ROUND
    for bad in ({"role": "tool", "content": "391"},  # which call it answers is missing
                {"role": "user", "content": "x", "tool_call_id": "call_1"},
                {"role": "user", "content": "x", "tool_calls": TOOL_ROUND[1]["tool_calls"]},
                {"role": "user", "content": None}, {"role": "system", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f"}}]}):
        r = put([bad])
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", bad


def test_terminal_chat_runs_the_calculator_and_feeds_the_result_back(caller):
    model, tok = caller
    engine = Engine(model, decode=tok.decode, max_batch=1, max_len=2048, eos_token_id=tok.eos_id)
    prompts, submit = [], engine.submit
    engine.submit = lambda ids, params: prompts.append(list(ids)) or submit(ids, params)
    out = io.StringIO()
    console = Console(file=out, width=10_000, color_system=None)
    messages = [{"role": "user", "content": "What is 17 * 23?"}]
    reply(engine, tok, console, messages, SamplingParams(max_new_tokens=30, temperature=1.0, seed=1), think=False,
          tools=Tools.offer(engine, tok))
    printed = out.getvalue()
    assert OPENER not in printed and "tool▁call" not in printed  # the call block is shown as calls, not tokens
    rounds = [m for m in messages if m.get("tool_calls")]
    assert 1 <= len(rounds) <= MAX_TOOL_ROUNDS and len(prompts) == len(rounds) + 1
    results = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
    for i, m in enumerate(rounds):
        for call in m["tool_calls"]:
            args = call["function"]["arguments"]
            assert call["function"]["name"] == "calculator" and "expression" in json.loads(args)
            result = results[call["id"]]
            assert result == run_calculator(args)  # the real calculator ran
            assert f"calculator {args}" in printed and f"= {result}" in printed
            assert result in tok.decode(prompts[i + 1])  # and its result went back to the model
    last = messages[-1]
    assert last["role"] == "assistant" and not last.get("tool_calls") and messages[-2]["role"] == "tool"
    if len(rounds) == MAX_TOOL_ROUNDS:  # the reply after the last round may not call: its grammar bans the opener
        assert OPENER not in last["content"]


def test_terminal_chat_without_tools_never_calls(caller):
    model, tok = caller
    engine = Engine(model, decode=tok.decode, max_batch=1, max_len=2048, eos_token_id=tok.eos_id)
    messages = [{"role": "user", "content": "hi"}]
    reply(engine, tok, Console(file=io.StringIO()), messages, SamplingParams(max_new_tokens=4, temperature=1.0),
          think=False)
    assert len(messages) == 2 and "tool_calls" not in messages[1]
    assert messages[1]["content"].startswith(OPENER)  # unconstrained, the biased model writes the opener as text


def test_nanoseek_chat_offers_the_calculator_unless_no_tools(caller, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from nanoseek import save_model
    from nanoseek.cli import app

    model, tok = caller
    folder = model_folder(tmp_path, "deepseek-v3.1")
    save_model(model, folder)
    base = ["chat", "--model", str(folder), "--max-tokens", "24", "--no-think"]
    with_tools = CliRunner().invoke(app, base, input="What is 2 + 2?\n/exit\n")
    assert with_tools.exit_code == 0, with_tools.output
    out = with_tools.output
    assert "may use a calculator" in out and "↳ calculator {\"expression\": " in out and re.search(r"\n  = \S", out)
    assert "tool▁call" not in out
    without = CliRunner().invoke(app, [*base, "--no-tools"], input="What is 2 + 2?\n/exit\n")
    assert without.exit_code == 0 and "calculator" not in without.output, without.output
    shutil.rmtree(folder)
