"""OpenAI's Responses API (POST /v1/responses; GET and DELETE /v1/responses/{id}, GET .../input_items) against a live
server, through the official `openai` SDK, the OpenAI Agents SDK's default (Responses) model, langchain-openai's
ChatOpenAI(use_responses_api=True) and litellm's responses calls: a Responses request is a chat completion in another
shape, so its prompt, calls, JSON and reasoning must be the chat route's, and what the route cannot serve is a 400
naming the field.

The model is test_clients.py's tiny random DeepSeek-V3 over DeepSeek's real tokenizer and V3.1's template: it writes
anything, and the grammar is what makes its calls and JSON valid."""

import json
import operator
import time
from functools import reduce

import httpx
import jsonschema
import openai
import pytest

from nanoseek.serve import server as server_module
from nanoseek.serve.protocol import InputItem
from nanoseek.serve.server import KeptResponses
from test_clients import ADD, KEY, WEATHER, Town, agents_add_tool, client, server  # noqa: F401 (fixtures)

FLAT = [{"type": "function", **t["function"]} for t in (ADD, WEATHER)]  # the Responses API's form of a tool
SCHEMAS = {t["name"]: t["parameters"] for t in FLAT}
ASK = "What is the weather in Paris, and what is 2 + 3?"


def streamed(client, **request) -> list:
    with client.responses.create(stream=True, **request) as stream:
        return list(stream)


def check_events(events) -> None:
    """Numbered in order; the response created and in progress, then each output item added, written and done in
    OpenAI's order (content part, deltas, done), then the whole response, whose output is the items done."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed", "response.incomplete")
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    done, i = [], 2
    while i < len(events) - 1:
        added = events[i]
        assert added.type == "response.output_item.added" and added.output_index == len(done), kinds[i:]
        item, i = added.item, i + 1
        if item.type == "function_call":
            deltas = "response.function_call_arguments.delta"
            ends = ["response.function_call_arguments.done"]
        else:
            assert events[i].type == "response.content_part.added" and events[i].part.text == ""
            i += 1
            kind = "reasoning_text" if item.type == "reasoning" else "output_text"
            deltas, ends = f"response.{kind}.delta", [f"response.{kind}.done", "response.content_part.done"]
        text = ""
        while events[i].type == deltas:
            assert events[i].item_id == item.id and events[i].output_index == len(done)
            text, i = text + events[i].delta, i + 1
        assert [e.type for e in events[i:i + len(ends)]] == ends, kinds[i:]
        assert (events[i].arguments if item.type == "function_call" else events[i].text) == text
        i += len(ends)
        assert events[i].type == "response.output_item.done" and events[i].item.id == item.id
        done.append(events[i].item)
        i += 1
    assert [plain(o) for o in events[-1].response.output] == [plain(o) for o in done]
    final = events[-1].response  # a time it completed at, once it has (OpenAI's completed_at)
    assert events[0].response.completed_at is None
    assert (final.completed_at is not None) == (final.status == "completed")
    assert final.completed_at is None or final.created_at <= final.completed_at <= time.time() + 1


def plain(item) -> dict:
    """An output item without what the SDK's stream helper parses into it."""
    d = item.to_dict()
    d.pop("parsed_arguments", None)
    for part in d.get("content") or []:
        part.pop("parsed", None)
    return d


def test_plain_input_streamed_equals_non_streamed(client):
    request = dict(model="deepseek-chat", input="Say something.", max_output_tokens=12, temperature=0)
    r = client.responses.create(**request)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "deepseek-chat" and r.error is None
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.output_text and r.output[0].content[0].type == "output_text"
    u = r.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 12 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0 and u.input_tokens_details.cached_tokens >= 0
    assert r.temperature == 0 and r.max_output_tokens == 12 and r.tool_choice == "auto" and r.tools == []
    events = streamed(client, **request)
    check_events(events)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    final = events[-1].response
    assert final.status == r.status and final.output_text == r.output_text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (u.input_tokens, u.output_tokens)
    assert final.usage.input_tokens_details.cached_tokens > 0  # the same prompt again: from the prefix cache
    with client.responses.stream(**request) as stream:  # the SDK's helper accumulates the same text
        texts = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
    assert texts[-1] == r.output_text


def test_instructions_and_input_items_prompt_as_chat_does(client):
    """Instructions are a first system message; earlier turns (text parts, a reasoning item that is dropped, a
    developer message) render as the same chat's: the same prompt tokens."""
    items = [{"role": "user", "content": "Hi."},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
             {"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "input_text", "text": "What is "},
                                          {"type": "input_text", "text": "2+2?"}]}]
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello!"}, {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"}]
    for model in ("deepseek-chat", "tiny-v3"):  # thinking off and on
        r = client.responses.create(model=model, instructions="Answer in French.", input=items, max_output_tokens=1)
        c = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
        assert r.usage.input_tokens == c.usage.prompt_tokens and r.instructions == "Answer in French."


def test_a_forced_call_then_its_output(client):
    first = client.responses.create(model="deepseek-chat", input=ASK, tools=FLAT, tool_choice={"type": "function",
                                    "name": "add"}, parallel_tool_calls=False, max_output_tokens=60, temperature=1.0,
                                    extra_body={"seed": 1})
    assert first.status == "completed" and [o.type for o in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "add" and call.call_id and call.id.startswith("fc_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["add"])
    history = [{"role": "user", "content": ASK}, *[o.model_dump(exclude_none=True) for o in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "5"}]
    second = client.responses.create(model="deepseek-chat", input=history, tools=FLAT, tool_choice="none",
                                     max_output_tokens=4)
    assert [o.type for o in second.output] == ["message"]
    # the call and its result are in the prompt
    assert second.usage.input_tokens > first.usage.input_tokens + len(call.arguments) // 4
    with client.responses.stream(model="deepseek-chat", input=ASK, tools=FLAT, tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=60, temperature=1.0,
                                 extra_body={"seed": 2}) as stream:
        check_events(list(stream))
        streamed_call = stream.get_final_response().output  # the SDK's helper: only a completed response has one
    assert [o.type for o in streamed_call] == ["function_call"] and streamed_call[0].status == "completed"
    jsonschema.validate(json.loads(streamed_call[0].arguments), SCHEMAS[streamed_call[0].name])


def test_json_schema_output_validates(client):
    schema = Town.model_json_schema() | {"additionalProperties": False}
    for model in ("deepseek-chat", "tiny-v3"):  # the JSON follows the reasoning when thinking
        r = client.responses.create(model=model, input="A town?", max_output_tokens=120, extra_body={"seed": 1}, text={
            "format": {"type": "json_schema", "name": "town", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(r.output_text), schema)
        assert r.text.format.type == "json_schema" and r.text.format.name == "town"
    parsed = client.responses.parse(model="deepseek-chat", input="A town?", text_format=Town, max_output_tokens=120)
    assert isinstance(parsed.output_parsed, Town)
    r = client.responses.create(model="deepseek-chat", input="JSON?", max_output_tokens=60,
                                text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(r.output_text), dict)


def test_a_reply_cut_at_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model="deepseek-chat", input="Tell me a story.", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[-1].status == "incomplete"
    events = streamed(client, model="deepseek-chat", input="Tell me a story.", max_output_tokens=2)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_reasoning_is_a_reasoning_item(client):
    """A thinking model's reasoning is the first output item (vLLM's shape: reasoning_text content); effort "none"
    turns thinking off, any other effort turns it on for the model that does not think by default."""
    for model, reasoning in (("tiny-v3", None), ("deepseek-chat", {"effort": "low", "summary": "auto"})):
        request = dict(model=model, input="Hi.", max_output_tokens=8, temperature=0,
                       **({"reasoning": reasoning} if reasoning else {}))
        r = client.responses.create(**request)
        assert r.output[0].type == "reasoning" and r.output[0].summary == []
        assert r.output[0].content[0].type == "reasoning_text" and r.output[0].content[0].text
        assert r.usage.output_tokens_details.reasoning_tokens > 0
        events = streamed(client, **request)
        check_events(events)
        text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        assert text == r.output[0].content[0].text == events[-1].response.output[0].content[0].text
    r = client.responses.create(model="tiny-v3", input="Hi.", max_output_tokens=8, reasoning={"effort": "none"})
    assert all(o.type != "reasoning" for o in r.output) and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.reasoning.effort == "none"


def test_previous_response_id_continues_the_conversation(client):
    """A follow-up naming an earlier response sends its conversation (input, instructions left out, and output) as
    if it had been given again; a call's output may answer the earlier response's call."""
    first = client.responses.create(model="deepseek-chat", input="Hi.", max_output_tokens=4, temperature=0)
    second = client.responses.create(model="deepseek-chat", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    whole = client.responses.create(model="deepseek-chat", max_output_tokens=1, input=[
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}])
    assert second.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    called = client.responses.create(model="deepseek-chat", input=ASK, tools=FLAT, tool_choice="required",
                                     parallel_tool_calls=False, max_output_tokens=60, temperature=1.0,
                                     extra_body={"seed": 3}, stream=True)
    called = [e for e in called][-1].response  # a streamed response is kept too
    answer = client.responses.create(model="deepseek-chat", previous_response_id=called.id, tools=FLAT, input=[
        {"type": "function_call_output", "call_id": o.call_id, "output": "5"} for o in called.output],
        max_output_tokens=4)
    assert answer.usage.input_tokens > called.usage.input_tokens + len(called.output[0].arguments) // 4
    unkept = client.responses.create(model="deepseek-chat", input="Hi.", max_output_tokens=1, store=False)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="deepseek-chat", input="Hi.", previous_response_id=unkept.id)
    assert e.value.body["param"] == "previous_response_id" and unkept.id in e.value.body["message"]


def test_a_kept_response_is_retrieved_its_input_items_listed_and_deleted(client):
    """GET /v1/responses/{id} answers the Response as it was answered (streamed or not); input_items lists what it
    answered, the conversation it followed included (instructions are no item), newest first unless asked, the
    SDK paging through it; DELETE forgets it. A response deleted, never kept (store: false) or unknown is a 404."""
    first = client.responses.create(model="deepseek-chat", instructions="Be brief.", input="Hi.", max_output_tokens=4)
    second = client.responses.create(model="deepseek-chat", previous_response_id=first.id, max_output_tokens=4,
                                     input=[{"role": "user", "content": [{"type": "input_text", "text": "And then?"}]}])
    assert client.responses.retrieve(second.id).to_dict() == second.to_dict()
    items = list(client.responses.input_items.list(second.id))
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert items[0].content[0].text == "And then?" and items[2].content[0].text == "Hi."
    assert items[1].id == first.output[0].id and items[1].content[0].text == first.output_text
    assert [i.id for i in client.responses.input_items.list(second.id, order="asc", limit=1)] == [
        i.id for i in reversed(items)]
    called = streamed(client, model="deepseek-chat", input=ASK, tools=FLAT, parallel_tool_calls=False,
                      tool_choice={"type": "function", "name": "add"}, max_output_tokens=60, temperature=1.0,
                      extra_body={"seed": 1})[-1].response
    assert client.responses.retrieve(called.id).to_dict() == called.to_dict()
    call = called.output[0]
    answer = client.responses.create(model="deepseek-chat", previous_response_id=called.id, tools=FLAT, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "5"}], max_output_tokens=2)
    asked, made, output = client.responses.input_items.list(answer.id, order="asc").data
    assert asked.content[0].text == ASK and output.call_id == call.call_id and output.output == "5" and output.id
    assert (made.type, made.id, made.call_id, made.name, made.arguments) == (
        "function_call", call.id, call.call_id, call.name, call.arguments)

    unkept = client.responses.create(model="deepseek-chat", input="Hi.", max_output_tokens=1, store=False)
    client.responses.delete(first.id)
    for gone in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id),
                 lambda: client.responses.input_items.list(first.id), lambda: client.responses.retrieve(unkept.id),
                 lambda: client.responses.retrieve("resp_nosuch")):
        with pytest.raises(openai.NotFoundError) as e:
            gone()
        assert e.value.body["code"] == "not_found" and e.value.body["param"] is None
        assert "is kept here" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match=first.id):
        client.responses.create(model="deepseek-chat", input="Hi.", previous_response_id=first.id)
    assert client.responses.retrieve(second.id).id == second.id  # a later response keeps its own conversation


@pytest.mark.parametrize("path,query,param", [
    ("/input_items", {"limit": 0}, "limit"),
    ("/input_items", {"limit": 101}, "limit"),
    ("/input_items", {"limit": "many"}, "limit"),
    ("/input_items", {"order": "up"}, "order"),
    ("/input_items", {"after": "msg_nosuch"}, "after"),
    ("/input_items", {"include[]": "message.output_text.logprobs"}, "include"),
    ("", {"include": "file_search_call.results"}, "include"),
    ("", {"stream": "true"}, "stream"),
    ("", {"stream": "maybe"}, "stream"),
])
def test_what_a_retrieval_cannot_serve_is_a_400_naming_the_parameter(server, client, path, query, param):
    rid = client.responses.create(model="deepseek-chat", input="Hi.", max_output_tokens=1).id
    r = httpx.get(f"{server}/v1/responses/{rid}{path}", params=query, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_kept_responses_need_the_key(server, client):
    rid = client.responses.create(model="deepseek-chat", input="Hi.", max_output_tokens=1).id
    for method, path in (("GET", rid), ("GET", f"{rid}/input_items"), ("DELETE", rid)):
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            r = httpx.request(method, f"{server}/v1/responses/{path}", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path, r.text)
    assert client.responses.retrieve(rid).id == rid  # none of them deleted it


def test_kept_responses_are_bounded():
    """The latest `limit` responses, at most `max_chars` in all (a conversation counts whole in each response that
    holds it, and 64 more an item, and the response itself as JSON), the least recently used forgotten first; the
    newest is kept whatever its size."""
    ask = [InputItem(role="user", content="x" * 100)]  # 164

    def response(rid: str, output=()) -> dict:
        return {"id": rid, "object": "response", "output": list(output)}

    kept = KeptResponses(limit=2, max_chars=10**6)
    for rid in ("a", "b", "c"):
        kept.keep(response(rid), ask)
    with pytest.raises(Exception, match="previous_response_id"):
        kept.conversation("a")
    kept.conversation("b")  # used: c is now the least recently used
    kept.keep(response("d"), ask)
    assert list(kept.kept) == ["b", "d"]
    kept = KeptResponses(limit=10, max_chars=1600)
    a = 164 + len(json.dumps(response("a")))
    kept.keep(response("a"), ask)
    assert kept.chars == a
    answer = {"type": "message", "id": "msg_1", "role": "assistant", "content": "y" * 400}
    kept.keep(response("b", [answer]), ask + kept.conversation("a"))
    b = 164 + 164 + 464 + len(json.dumps(response("b", [answer])))
    assert kept.chars == a + b
    kept.keep(response("c"), ask)
    assert list(kept.kept) == ["b", "c"] and kept.chars == b + a
    kept.forget("b")
    assert list(kept.kept) == ["c"] and kept.chars == a
    kept.keep(response("d"), [InputItem(role="user", content="z" * 5000)])
    assert list(kept.kept) == ["d"] and kept.chars == a + 4900


LONG = "word " * 2000  # over the tiny model's context of 1,024 tokens


@pytest.mark.parametrize("request_,param,text", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "input.0.content",
     "input_image"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input.0.content",
     "input_file"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type", "item_reference"),
    ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "3"}]}, "input.0.call_id", "call_9"),
    ({"input": [{"role": "user", "content": "Hi"}, {"type": "function_call", "call_id": "c1", "name": "f",
                                                     "arguments": "{}"}]}, "input", "function_call_output"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "web_search"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools.0.type", "file_search"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools.0.type", "code_interpreter"),
    ({"tools": FLAT, "tool_choice": {"type": "function", "name": "nosuch"}}, "tool_choice", "nosuch"),
    ({"background": True}, "background", "background"),
    ({"include": ["file_search_call.results"]}, "include", "file_search_call.results"),
    ({"include": ["message.output_text.logprobs"]}, "include", "logprobs"),
    ({"truncation": "auto"}, "truncation", "truncation"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": 7}}}}}}, "text.format", "text.format"),
    ({"previous_response_id": "resp_nosuch"}, "previous_response_id", "resp_nosuch"),
    ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"max_output_tokens": 5000}, "max_output_tokens", "max_output_tokens (5000)"),
    ({"input": LONG}, "input", "context"),
])
def test_what_is_not_served_is_a_400_naming_the_field(client, request_, param, text):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**{"model": "deepseek-chat", "input": "Hi", **request_})
    assert e.value.body["param"] == param and text in e.value.body["message"], e.value.body


def test_a_schema_no_reply_can_follow_is_a_400_or_ends_the_stream_with_an_error_event(client, monkeypatch):
    """llguidance gives up on this schema after the first token: a 400 before anything is sent, or, once a stream
    has opened (past FIRST_EVENT_WAIT), an `error` event that ends it, never a completed response."""
    loop = {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}},
                                                 "required": ["c"]}}}
    request = dict(model="deepseek-chat", input="JSON", max_output_tokens=20,
                   text={"format": {"type": "json_schema", "name": "loop", "schema": loop}})
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match=r"\(text.format or tools\) cannot be followed"):
            streamed(client, **request) if stream else client.responses.create(**request)
    monkeypatch.setattr(server_module, "FIRST_EVENT_WAIT", 0.0)
    events = streamed(client, **request)
    assert events[-1].type == "error" and "cannot be followed" in events[-1].message
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert not any(e.type in ("response.completed", "response.incomplete") for e in events)


def test_every_api_base_serves_responses(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for base in ("/v1", "", "/beta"):
        r = httpx.post(f"{server}{base}/responses", headers=auth,
                       json={"model": "deepseek-chat", "input": "Hi", "max_output_tokens": 1})
        assert r.status_code == 200 and r.json()["object"] == "response", (base, r.text)
        assert httpx.get(f"{server}{base}/responses/{r.json()['id']}", headers=auth).json() == r.json()


def test_openai_agents_sdk_runs_a_tool_through_responses(server):
    """The Agents SDK's default model speaks the Responses API: it sends the tool in the flat form, runs the call,
    sends its output back (the whole history, or only what is new with previous_response_id) and gets an answer. The
    answer is a Town (structured output): the random model's free text would run to max_tokens, a reply the SDK
    refuses as incomplete."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner
    from agents.items import ToolCallOutputItem

    add, seen = agents_add_tool()
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    create, sent = client.responses.create, []

    async def recorded(**request):
        sent.append(request)
        return await create(**request)

    client.responses.create = recorded
    agent = Agent(name="calc", instructions="Use the tool.", tools=[add], output_type=Town,
                  model=OpenAIResponsesModel(model="deepseek-chat", openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", max_tokens=60, temperature=0.0))
    for chained in (False, True):
        seen.clear(), sent.clear()
        result = Runner.run_sync(agent, "What is 2 + 3?", max_turns=6, auto_previous_response_id=chained)
        outputs = [item for item in result.new_items if isinstance(item, ToolCallOutputItem)]
        assert seen and outputs and str(outputs[0].output) == str(sum(seen[0]))  # the tool ran on the model's arguments
        assert isinstance(result.final_output, Town)  # then the model answered (the SDK resets tool_choice to auto)
        follow_up = sent[1]
        assert follow_up["input"][-1]["type"] == "function_call_output"
        if chained:  # only the call's output, after the response that made the call
            assert follow_up["previous_response_id"] == result.raw_responses[0].response_id
            assert [i["type"] for i in follow_up["input"]] == ["function_call_output"]


def test_langchain_openai_over_the_responses_api(server):
    """langchain-openai's ChatOpenAI with use_responses_api: a reply invoked and streamed, a call answered by a
    ToolMessage, structured output (json_schema, langchain's default)."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = ChatOpenAI(model="deepseek-chat", base_url=server + "/v1", api_key=KEY, max_tokens=60, temperature=0,
                     max_retries=0, use_responses_api=True)
    said = llm.invoke("Hi.")
    assert said.text and said.text == reduce(operator.add, llm.stream("Hi.")).text
    asked = HumanMessage("What is 2 + 3?")
    made = llm.bind_tools([add], tool_choice="add", parallel_tool_calls=False).invoke([asked])
    call = made.tool_calls[0]
    assert call["name"] == "add" and all(isinstance(call["args"][k], int) for k in "ab")
    answer = llm.bind_tools([add], tool_choice="none").invoke([asked, made, ToolMessage(
        str(add.invoke(call["args"])), tool_call_id=call["id"])])
    assert answer.text and not answer.tool_calls
    assert answer.usage_metadata["input_tokens"] > made.usage_metadata["input_tokens"]
    structured = ChatOpenAI(model="deepseek-chat", base_url=server + "/v1", api_key=KEY, max_tokens=120,
                            max_retries=0, use_responses_api=True).with_structured_output(Town)
    assert isinstance(structured.invoke("A town?"), Town)


def test_litellm_responses_and_the_kept_response_calls(server):
    """litellm's Responses API through its openai provider: a response, then its retrieval, input items and
    deletion (litellm wraps the ids it returns and unwraps them on the way back)."""
    import litellm

    where = dict(api_base=server + "/v1", api_key=KEY)
    r = litellm.responses(model="openai/deepseek-chat", input="Hi.", max_output_tokens=16, **where)
    assert r.output[0].type == "message" and r.output[0].content[0].text
    assert litellm.get_responses(response_id=r.id, **where).output[0].content[0].text == r.output[0].content[0].text
    items = litellm.list_input_items(response_id=r.id, **where)
    assert [i["content"][0]["text"] for i in items["data"]] == ["Hi."] and not items["has_more"]
    assert litellm.delete_responses(response_id=r.id, **where).deleted
    with pytest.raises(litellm.NotFoundError):
        litellm.get_responses(response_id=r.id, **where)


def test_allowed_tools_input_tokens_and_what_is_not_served(client, server):
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "add"}]}
    r = client.responses.create(model="deepseek-chat", input=ASK, tools=FLAT, tool_choice=choice, max_output_tokens=80,
                                temperature=1.0, extra_body={"seed": 1})
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and {c.name for c in calls} == {"add"} and r.tool_choice.type == "allowed_tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="deepseek-chat", input=ASK, tools=FLAT, tool_choice={**choice, "tools": [
            {"type": "function", "name": "nosuch"}]})
    assert e.value.body["param"] == "tool_choice.tools" and "nosuch" in e.value.body["message"]
    request = dict(model="deepseek-chat", input=ASK, instructions="Be brief.", tools=FLAT)
    counted = client.responses.input_tokens.count(**request)
    assert counted.input_tokens == client.responses.create(**request, max_output_tokens=1).usage.input_tokens
    with pytest.raises(openai.NotFoundError) as e:
        client.post("/responses/compact", body={"model": "deepseek-chat", "input": "hi"}, cast_to=object)
    assert "input_tokens" in e.value.body["message"]


def test_a_text_part_without_its_text_names_that(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="deepseek-chat", input=[{"role": "user", "content": [
            {"type": "input_text", "text": None}]}])
    assert e.value.body["param"] == "input.0.content" and "text of part 0" in e.value.body["message"], e.value.body
