"""The clients people use, against a live server: the official `openai` SDK (sync and async),
langchain-deepseek's ChatDeepSeek, langchain-openai's ChatOpenAI, litellm's deepseek provider and
the OpenAI Agents SDK, for function calling, structured outputs and reasoning.

The model is a tiny random DeepSeek-V3 over DeepSeek-V3's real tokenizer and V3.1's chat template (so the
tool-call tokens and format are DeepSeek's): it writes anything, and the grammar is what makes its
calls and JSON valid, which is what these tests check."""

import asyncio
import json
import os

import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field
from tokenizers import Tokenizer

from conftest import randomize_
from nanoseek.inference import Engine
from nanoseek.model import build_model, get_preset
from nanoseek.serve import create_app
from nanoseek.tokenizer import DeepSeekTokenizer
from test_chat_templates import REAL, model_folder
from test_server import KEY, LiveServer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm reads its price table from the network
V = 129280
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                   "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


class City(BaseModel):
    name: str
    population: int
    coastal: bool


class Town(BaseModel):  # bounded: the random model's reply ends before the budget does
    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=10**6)
    coastal: bool


class Loose(BaseModel):  # all optional: json mode guarantees JSON, not the schema
    name: str | None = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = model_folder(tmp_path_factory.mktemp("v31"), "deepseek-v3.1")  # tool calls, thinking on or off
    tok = DeepSeekTokenizer.load(folder)
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=V, eos_token_id=tok.eos_id, max_position_embeddings=1024)).eval()
    randomize_(model, std=0.05)
    engine = Engine(model, decode=tok.decode, max_batch=8, max_len=1024, eos_token_id=tok.eos_id)
    with LiveServer(create_app(engine, tok, name="tiny-v3", api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def check_calls(calls, names=None):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id and (names is None or c.function.name in names)
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("seed", [0, 1])
def test_openai_tool_choice_variants(client, seed):
    common = dict(model="deepseek-chat", messages=ASK, tools=[WEATHER, ADD], max_tokens=80, seed=seed, temperature=1.0)
    r = client.chat.completions.create(tool_choice="required", **common)
    assert r.choices[0].finish_reason == "tool_calls"
    check_calls(r.choices[0].message.tool_calls)
    r = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "add"}}, **common)
    check_calls(r.choices[0].message.tool_calls, {"add"})
    r = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **common)
    assert len(r.choices[0].message.tool_calls) == 1
    r = client.chat.completions.create(tool_choice="none", **common)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason in ("stop", "length")
    assert "tool▁call" not in (r.choices[0].message.content or "")
    r = client.chat.completions.create(**common)  # auto: text, calls, or both, never a broken block
    msg = r.choices[0].message
    assert "tool▁call" not in (msg.content or "")
    if msg.tool_calls:
        check_calls(msg.tool_calls)


def test_openai_streamed_tool_calls(client):
    stream = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[WEATHER, ADD], seed=3,
                                            tool_choice="required", max_tokens=80, stream=True, temperature=1.0)
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                if d.id:  # a call's first delta: id, type, name
                    assert d.index not in calls and d.type == "function" and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "args": d.function.arguments or ""}
                else:
                    calls[d.index]["args"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish in ("tool_calls", "length") and calls  # "length": the budget closed the block
    for c in calls.values():
        jsonschema.validate(json.loads(c["args"]), SCHEMAS[c["name"]])


def test_openai_tool_round_trip(client):
    first = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[ADD], tool_choice="required",
                                           max_tokens=60, seed=5)
    msg = first.choices[0].message
    history = ASK + [msg.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "5"} for c in msg.tool_calls]
    second = client.chat.completions.create(model="deepseek-chat", messages=history, tools=[ADD], tool_choice="none",
                                            max_tokens=10, seed=5)
    assert second.choices[0].message.content is not None
    # the call and its result are in the prompt: it is longer than the question by at least their text
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len(msg.tool_calls[0].function.arguments) // 4


def test_openai_legacy_functions(client):
    """OpenAI's deprecated `functions` / `function_call` (older agents and LangChain's functions agents send them): the
    call comes back as `message.function_call` (one a reply), streamed as function_call deltas, and a "function" message
    answers it."""
    functions = [ADD["function"], WEATHER["function"]]
    common = dict(model="deepseek-chat", messages=ASK, functions=functions, max_tokens=60, temperature=1.0, seed=2)
    r = client.chat.completions.create(function_call={"name": "add"}, **common)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "function_call" and msg.tool_calls is None and msg.function_call.name == "add"
    jsonschema.validate(json.loads(msg.function_call.arguments), SCHEMAS["add"])
    stream = client.chat.completions.create(function_call={"name": "get_weather"}, stream=True, **common)
    name, args, finish = None, "", None
    for chunk in stream:
        for choice in chunk.choices:
            assert choice.delta.tool_calls is None
            if (call := choice.delta.function_call) is not None:
                assert name is None or call.name is None  # the name once, in the first delta
                name, args = name or call.name, args + (call.arguments or "")
            finish = choice.finish_reason or finish
    assert finish == "function_call" and name == "get_weather"
    jsonschema.validate(json.loads(args), SCHEMAS["get_weather"])
    history = ASK + [msg.model_dump(exclude_none=True), {"role": "function", "name": "add", "content": "5"}]
    second = client.chat.completions.create(model="deepseek-chat", messages=history, functions=functions,
                                            function_call="none", max_tokens=10, seed=5)
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.function_call is None
    assert second.usage.prompt_tokens > r.usage.prompt_tokens + len(msg.function_call.arguments) // 4


def test_openai_async_tools(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
        rs = await asyncio.gather(*[client.chat.completions.create(
            model="deepseek-chat", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, seed=s,
            temperature=1.0) for s in range(3)])
        for r in rs:
            check_calls(r.choices[0].message.tool_calls, {"get_weather"})

    asyncio.run(main())


def parsed_city(client, **request) -> City:
    """The City of a structured reply. The random model's strings run on until the budget closes them,
    which finish_reason reports as "length" and the SDK's parse() then raises: the reply still validates."""
    try:
        return client.chat.completions.parse(response_format=City, **request).choices[0].message.parsed
    except openai.LengthFinishReasonError as e:
        return City.model_validate_json(e.completion.choices[0].message.content)


def test_openai_json_schema_strict(client):
    for model in ("deepseek-chat", "tiny-v3"):  # thinking off, and on (the JSON follows the reasoning)
        assert isinstance(parsed_city(client=client, model=model, messages=[{"role": "user", "content": "A city?"}],
                                      max_tokens=120, seed=1), City)


def test_stop_strings_never_cut_a_call_or_json(client):
    """Stop strings apply to free text, not inside the call block or JSON the grammar writes (agent
    frameworks send stop ["\n"]; a stop inside the block left raw call tokens in content)."""
    common = dict(model="deepseek-chat", messages=ASK, tools=[WEATHER, ADD], tool_choice="required", max_tokens=80,
                  seed=0, temperature=1.0, stop=["\n", "weather", "{", '"', "add"])
    r = client.chat.completions.create(**common)
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    check_calls(r.choices[0].message.tool_calls)
    streamed = {}
    for chunk in client.chat.completions.create(stream=True, **common):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            streamed[d.index] = streamed.get(d.index, "") + (d.function.arguments or "")
    assert list(streamed.values()) == [c.function.arguments for c in r.choices[0].message.tool_calls]
    assert isinstance(parsed_city(client, model="deepseek-chat", messages=[{"role": "user", "content": "A city?"}],
                                  max_tokens=120, seed=1, stop=['"', ","]), City)


def test_a_budget_that_ends_a_call_says_length(client):
    """A call (or JSON) the budget closed is complete and parses, but its finish_reason is "length":
    an agent must not run arguments that were cut short as if the model had finished them."""
    for max_tokens, finish in ((20, "length"), (40, "tool_calls")):  # the random model's calls take 22-23 tokens
        for seed in range(3):
            r = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[WEATHER], seed=seed,
                                               tool_choice="required", max_tokens=max_tokens, temperature=1.0)
            check_calls(r.choices[0].message.tool_calls)
            assert r.choices[0].finish_reason == finish
    r = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=12)  # too few for any call: cut, and no call tokens in content
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert "tool▁call" not in (r.choices[0].message.content or "")


def test_json_response_format_with_tools_is_json_or_calls(client):
    """tool_choice "auto" with a response format: the answer is the JSON asked for, or calls."""
    for seed in range(3):
        r = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[WEATHER, ADD], max_tokens=120,
                                           seed=seed, temperature=1.0, response_format={"type": "json_object"})
        msg = r.choices[0].message
        if msg.tool_calls:
            check_calls(msg.tool_calls)
        else:
            assert isinstance(json.loads(msg.content), dict), msg.content


@pytest.mark.parametrize("tools,param", [
    ([{"type": "function", "function": {"name": "bad name!"}}], "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "tools.0.function.parameters"),
    ([{"type": "function"}], "tools.0.function"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "tools.0.type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 7}}}}}],
     "tools"),
])
def test_malformed_tools_are_400_naming_the_field(client, tools, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=tools, tool_choice="required")
    assert e.value.body["param"] == param, e.value.body


def test_unknown_named_tool_choice_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[ADD],
                                       tool_choice={"type": "function", "function": {"name": "nosuch"}})


def test_bad_tool_choices_and_tool_turns_are_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[ADD], tool_choice="sometimes")
    assert e.value.body["param"] == "tool_choice", e.value.body  # not pydantic's union member
    with pytest.raises(openai.BadRequestError) as e:  # a named choice without its function: that is what is missing
        client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[ADD], tool_choice={"type": "function"})
    assert e.value.body["param"] == "tool_choice.function", e.value.body
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    for turn, text in (({"role": "tool", "content": "3"}, "tool_call_id"),
                       ({"role": "tool", "tool_call_id": "call_9", "content": "3"}, "'call_9' answers no call")):
        history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}, turn]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="deepseek-chat", messages=history, tools=[ADD])
        assert text in e.value.body["message"], e.value.body
        assert e.value.body["param"] == "messages.2.tool_call_id", e.value.body


def test_langchain_deepseek(server):
    from langchain_core.tools import tool
    from langchain_deepseek import ChatDeepSeek

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = ChatDeepSeek(model="deepseek-chat", api_base=server + "/v1", api_key=KEY, max_tokens=80, max_retries=0)
    msg = llm.bind_tools([add], tool_choice="any").invoke("2 + 3?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "add"
    assert set(msg.tool_calls[0]["args"]) == {"a", "b"} and all(isinstance(v, int) for v in msg.tool_calls[0]["args"].values())
    city = llm.with_structured_output(City).invoke("A city?")  # default: function calling
    assert isinstance(city, City)
    assert isinstance(llm.with_structured_output(Loose, method="json_mode").invoke("A city, in JSON?"), Loose)
    thinker = ChatDeepSeek(model="deepseek-reasoner", api_base=server + "/v1", api_key=KEY, max_tokens=20, max_retries=0)
    assert "reasoning_content" in thinker.invoke("hi").additional_kwargs


def test_langchain_openai_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="deepseek-chat", base_url=server + "/v1", api_key=KEY, max_tokens=120, max_retries=0)
    assert isinstance(llm.with_structured_output(Town).invoke("A town?"), Town)  # json_schema, strict


def test_litellm_deepseek_provider(server):
    import litellm

    r = litellm.completion(model="deepseek/deepseek-chat", api_base=server + "/v1", api_key=KEY, messages=ASK,
                           tools=[WEATHER, ADD], tool_choice="required", max_tokens=80)
    check_calls(r.choices[0].message.tool_calls)
    r = litellm.completion(model="deepseek/deepseek-reasoner", api_base=server + "/v1", api_key=KEY,
                           messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    assert r.choices[0].message.reasoning_content is not None


def agents_add_tool():
    """An OpenAI Agents SDK function tool adding two integers (tracing off: nothing leaves the machine), and the
    list of the arguments it is called with."""
    from agents import function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen = []

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    return add, seen


def test_openai_agents_sdk_calls_a_local_tool(server):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner
    from agents.items import ToolCallOutputItem

    add, seen = agents_add_tool()
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    agent = Agent(name="calc", instructions="Use the tool.", tools=[add],
                  model=OpenAIChatCompletionsModel(model="deepseek-chat", openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", max_tokens=60, temperature=0.0))
    result = Runner.run_sync(agent, "What is 2 + 3?", max_turns=6)
    outputs = [item for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert seen and outputs and str(outputs[0].output) == str(sum(seen[0]))  # the tool ran on the model's arguments
    assert isinstance(result.final_output, str)  # then the model answered (the SDK resets tool_choice to auto)


def test_the_shipped_model_calls_the_calculator_and_answers_from_it():
    """The shipped model, asked a multiplication beyond its head through the API with the calculator
    offered, calls it with the right expression and answers with the result (six digits: the model shipped
    since session 39 writes a seven-digit result back a digit short, 612540 for 8567 * 715's 6125405, which the
    one before copied whole; see the README); offered nothing, or under tool_choice "none", it calls nothing."""
    from pathlib import Path

    import nanoseek
    from nanoseek.tools import CALCULATOR, run_calculator

    folder = Path(nanoseek.__file__).parent / "assets" / "model"
    model, tok = nanoseek.load_model(folder), DeepSeekTokenizer.load(folder)
    engine = Engine(model, decode=tok.decode, max_batch=4)
    with LiveServer(create_app(engine, tok, name="nanoseek")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for question, expression, product, model_name in (("What is 4821 * 37?", "4821 * 37", "178377", "deepseek-chat"),
                                                          ("What is 999 * 888?", "999 * 888", "887112", "deepseek-reasoner")):
            ask = [{"role": "user", "content": question}]
            r = c.chat.completions.create(model=model_name, messages=ask, tools=[CALCULATOR], temperature=0)
            call = r.choices[0].message.tool_calls[0]
            assert r.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments) == {
                "expression": expression}
            result = run_calculator(call.function.arguments)
            history = ask + [r.choices[0].message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": result}]
            answer = c.chat.completions.create(model=model_name, messages=history, tools=[CALCULATOR], temperature=0)
            assert answer.choices[0].message.content == result == product
        # thinking on, this question once got a raw call written into the reply of a request without tools
        for question, model_name in (("What is 8567 * 715?", "deepseek-chat"), ("What is 4821 * 37?", "nanoseek")):
            for extra in ({}, {"tools": [CALCULATOR], "tool_choice": "none"}):
                r = c.chat.completions.create(model=model_name, messages=[{"role": "user", "content": question}],
                                              temperature=0, max_tokens=96, **extra)
                m = r.choices[0].message
                assert not m.tool_calls and "tool▁" not in m.content + (getattr(m, "reasoning_content", "") or "")


def test_a_required_call_or_json_comes_back_though_the_reply_would_end_in_its_reasoning(client):
    """With thinking on, a reply that wrote its end of sequence inside its reasoning ended there: no call under
    tool_choice 'required' or a named function, no JSON under a json_schema, finish_reason 'stop' (the SDK's parse()
    gave parsed None). The end is now banned until the reasoning has ended (here it is pushed first at every step)."""
    eos = Tokenizer.from_file(str(REAL / "tokenizer.json")).token_to_id("<｜end▁of▁sentence｜>")
    common = dict(model="deepseek-reasoner", messages=ASK, max_tokens=80, logit_bias={str(eos): 100}, seed=0,
                  temperature=1.0)
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        r = client.chat.completions.create(tools=[WEATHER, ADD], tool_choice=choice, **common)
        check_calls(r.choices[0].message.tool_calls, None if choice == "required" else {"add"})
    r = client.chat.completions.create(response_format={"type": "json_schema", "json_schema": {
        "name": "town", "schema": Town.model_json_schema()}}, **common)
    Town.model_validate_json(r.choices[0].message.content)


def test_logprobs_cover_the_content_not_the_block_of_calls(client):
    r = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[ADD], tool_choice="required",
                                       max_tokens=60, logprobs=True, temperature=0)
    msg = r.choices[0].message
    assert msg.tool_calls and not msg.content
    assert not (r.choices[0].logprobs and r.choices[0].logprobs.content), r.choices[0].logprobs
    r = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[ADD], max_tokens=30, seed=1,
                                       logprobs=True, temperature=1.0)
    entries = r.choices[0].logprobs.content if r.choices[0].logprobs else []
    assert "".join(e.token for e in entries) == (r.choices[0].message.content or "")


def test_allowed_tools_offers_those_alone(client):
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "add"}}]}}
    for seed in range(3):
        r = client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[WEATHER, ADD], tool_choice=choice,
                                           max_tokens=80, seed=seed, temperature=1.0)
        check_calls(r.choices[0].message.tool_calls, {"add"})
    bad = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "nosuch"}}]}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="deepseek-chat", messages=ASK, tools=[ADD], tool_choice=bad)
    assert "nosuch" in e.value.body["message"] and e.value.body["param"].startswith("tool_choice"), e.value.body
