"""Anthropic's Messages API (/anthropic/v1/messages, as DeepSeek serves it) against a live server, through the official
`anthropic` SDK: a message is a chat completion in another shape, so its prompt, calls, reasoning and usage must be the
chat route's, and what the route cannot serve is a 400 in Anthropic's error shape naming the field.

The model is test_clients.py's tiny random DeepSeek-V3 over DeepSeek's real tokenizer and V3.1's template (context
1,024): it writes anything, and the grammar is what makes its calls and JSON valid. The SDK has no temperature argument
(newer Claude models dropped it): extra_body sends it, as DeepSeek's API takes it."""

import json

import anthropic
import httpx
import jsonschema
import pytest

from nanoseek.serve import server as server_module
from test_clients import ADD, KEY, WEATHER, Town, client, server  # noqa: F401 (fixtures)

TOOLS = [{"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}
         for f in (ADD["function"], WEATHER["function"])]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
GREEDY = {"temperature": 0}
RAW = {"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
       "message_stop"}  # the wire's events (the SDK's stream helper adds its own: text, thinking, input_json...)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server + "/anthropic", api_key=KEY, max_retries=0)


def post(server, body, path: str = "/messages") -> httpx.Response:
    """The body as JSON (non-ASCII escaped: a lone surrogate too)."""
    return httpx.post(f"{server}/anthropic/v1{path}", content=json.dumps(body),
                      headers={"x-api-key": KEY, "content-type": "application/json"}, timeout=60)


def streamed(claude, **request) -> tuple[list, anthropic.types.Message]:
    """The wire's events of a streamed request and the message the SDK's helper builds from them."""
    with claude.messages.stream(**request) as stream:
        events = [e for e in stream if e.type in RAW]
        return events, stream.get_final_message()


def check_events(events) -> None:
    """message_start, then each block started, its deltas and stopped in order of index, then message_delta and
    message_stop."""
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
    assert events[0].message.content == [] and events[0].message.stop_reason is None
    i, index = 1, 0
    while kinds[i] == "content_block_start":
        assert events[i].index == index
        i += 1
        while kinds[i] == "content_block_delta":
            assert events[i].index == index
            i += 1
        assert kinds[i] == "content_block_stop" and events[i].index == index, kinds
        i, index = i + 1, index + 1
    assert i == len(events) - 2, kinds


def blocks(message) -> list[dict]:
    """A message's content as plain dicts (the SDK's stream helper builds blocks of its own classes)."""
    return [{k: v for k, v in b.to_dict().items() if k != "parsed_output"} for b in message.content]


def prompt_tokens(usage) -> int:
    """The whole prompt: Anthropic counts the tokens read from the (prefix) cache apart from input_tokens."""
    assert usage.cache_creation_input_tokens == 0
    return usage.input_tokens + usage.cache_read_input_tokens


def test_a_message_and_its_stream(claude):
    request = dict(model="deepseek-chat", max_tokens=12, messages=[{"role": "user", "content": "Say something."}],
                   extra_body=GREEDY)
    m = claude.messages.create(**request)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == "deepseek-chat"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert 0 < m.usage.output_tokens <= 12 and prompt_tokens(m.usage) > 0
    events, final = streamed(claude, **request)
    check_events(events)
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == m.content[0].text
    assert blocks(final) == blocks(m) and final.stop_reason == m.stop_reason
    assert final.usage.output_tokens == m.usage.output_tokens and prompt_tokens(final.usage) == prompt_tokens(m.usage)
    assert final.usage.cache_read_input_tokens > 0  # the same prompt again: from the prefix cache
    with claude.messages.stream(**request) as stream:
        assert "".join(stream.text_stream) == m.content[0].text


def test_system_turns_and_count_tokens_prompt_as_chat_does(claude, client):
    """The system prompt is a first system message; earlier turns (text blocks a line each, thinking blocks dropped)
    render as the same chat's: the same prompt tokens, which count_tokens counts without generating."""
    system = [{"type": "text", "text": "Answer in French."}, {"type": "text", "text": "Be brief."}]
    messages = [{"role": "user", "content": "Hi."},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                  {"type": "redacted_thinking", "data": "x"},
                                                  {"type": "text", "text": "Hello!"}]},
                {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]}]
    chat = [{"role": "system", "content": "Answer in French.\nBe brief."}, {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is\n2+2?"}]
    for model in ("deepseek-chat", "tiny-v3"):  # thinking off and on
        m = claude.messages.create(model=model, system=system, messages=messages, max_tokens=1)
        c = client.chat.completions.create(model=model, messages=chat, max_tokens=1)
        assert prompt_tokens(m.usage) == c.usage.prompt_tokens
        assert claude.messages.count_tokens(model=model, system=system, messages=messages).input_tokens == \
            c.usage.prompt_tokens


def test_a_forced_tool_then_its_result(claude):
    request = dict(model="deepseek-chat", max_tokens=60, tools=TOOLS, messages=ASK, extra_body=GREEDY,
                   tool_choice={"type": "tool", "name": "add", "disable_parallel_tool_use": True})
    first = claude.messages.create(**request)
    assert first.stop_reason == "tool_use" and [b.type for b in first.content] == ["tool_use"]
    call = first.content[0]
    assert call.name == "add" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, SCHEMAS["add"])
    counted = claude.messages.count_tokens(model="deepseek-chat", tools=TOOLS, messages=ASK,
                                           tool_choice=request["tool_choice"])
    assert counted.input_tokens == prompt_tokens(first.usage)
    events, final = streamed(claude, **request)
    check_events(events)
    assert {e.delta.type for e in events if e.type == "content_block_delta"} == {"input_json_delta"}
    assert [(b.name, b.input) for b in final.content] == [("add", call.input)] and final.stop_reason == "tool_use"
    history = [*ASK, first.to_param(), {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "5"}]}]}]
    second = claude.messages.create(model="deepseek-chat", max_tokens=4, tools=TOOLS, messages=history)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # the call and its result are in the prompt
    assert prompt_tokens(second.usage) > prompt_tokens(first.usage) + len(json.dumps(call.input)) // 4
    failed = [*history[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "no such city", "is_error": True},
        {"type": "text", "text": "Try again."}]}]
    assert claude.messages.create(model="deepseek-chat", max_tokens=1, tools=TOOLS, messages=failed).content


def test_any_tool_may_be_called_several_times(claude):
    m = claude.messages.create(model="deepseek-chat", max_tokens=120, tools=TOOLS, messages=ASK,
                               tool_choice={"type": "any"}, extra_body={"temperature": 1.0})
    calls = [b for b in m.content if b.type == "tool_use"]
    assert calls and m.stop_reason in ("tool_use", "max_tokens")  # max_tokens: the budget closed the block
    for c in calls:
        jsonschema.validate(c.input, SCHEMAS[c.name])


def test_thinking_is_a_thinking_block_first(claude):
    """The thinking model reasons by default; thinking enabled turns it on for deepseek-chat (budget_tokens is
    accepted, as DeepSeek accepts it), disabled turns it off."""
    for model, thinking in (("tiny-v3", None), ("deepseek-chat", {"type": "enabled", "budget_tokens": 1024})):
        request = dict(model=model, max_tokens=8, messages=[{"role": "user", "content": "Hi."}], extra_body=GREEDY,
                       **({"thinking": thinking} if thinking else {}))
        m = claude.messages.create(**request)
        assert m.content[0].type == "thinking" and m.content[0].thinking and m.content[0].signature == ""
        events, final = streamed(claude, **request)
        check_events(events)
        text = "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                       and e.delta.type == "thinking_delta")
        assert text == m.content[0].thinking == final.content[0].thinking
    m = claude.messages.create(model="tiny-v3", max_tokens=8, messages=[{"role": "user", "content": "Hi."}],
                               thinking={"type": "disabled"})
    assert m.content and all(b.type == "text" for b in m.content)


def test_max_tokens_and_the_contexts_end(claude):
    """A reply cut at max_tokens says max_tokens; a max_tokens over what the context leaves (Claude Code asks for
    32,000) is cut to it, and a reply that reaches the context's end says model_context_window_exceeded."""
    ask = [{"role": "user", "content": "Tell me a story."}]
    m = claude.messages.create(model="deepseek-chat", max_tokens=2, messages=ask)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2
    events, _ = streamed(claude, model="deepseek-chat", max_tokens=2, messages=ask)
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 2
    one = claude.messages.count_tokens(model="deepseek-chat", messages=[{"role": "user", "content": "word " * 100}])
    two = claude.messages.count_tokens(model="deepseek-chat", messages=[{"role": "user", "content": "word " * 200}])
    per_word = (two.input_tokens - one.input_tokens) / 100
    words = 200 + int((1024 - 6 - two.input_tokens) / per_word)  # a prompt that leaves a few tokens
    full = [{"role": "user", "content": "word " * words}]
    left = 1024 - claude.messages.count_tokens(model="deepseek-chat", messages=full).input_tokens
    assert 0 < left < 20
    m = claude.messages.create(model="deepseek-chat", max_tokens=32_000, messages=full, extra_body=GREEDY, timeout=60)
    assert m.stop_reason == "model_context_window_exceeded" and m.usage.output_tokens == left


def test_a_stop_sequence_ends_the_reply_and_is_named(claude):
    request = dict(model="deepseek-chat", max_tokens=16, messages=[{"role": "user", "content": "Say something."}],
                   extra_body=GREEDY)
    text = claude.messages.create(**request).content[0].text
    at, piece = next((k, text[k:k + 2]) for k in range(1, len(text) - 1)
                     if text.find(text[k:k + 2]) == k and not any(c.isspace() for c in text[k:k + 2]))
    m = claude.messages.create(stop_sequences=["never written", piece], **request)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == piece
    assert m.content[0].text == text[:at].strip()
    events, final = streamed(claude, stop_sequences=[piece], **request)
    assert events[-2].delta.stop_sequence == piece and final.stop_reason == "stop_sequence"
    assert final.content[0].text == m.content[0].text


def test_a_last_assistant_message_is_continued(claude, client):
    """Prefill: the reply goes on from a last assistant message, as chat's prefix completion with no reasoning."""
    for model in ("deepseek-chat", "tiny-v3"):
        m = claude.messages.create(model=model, max_tokens=4, extra_body=GREEDY, messages=[
            {"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "The answer is"}])
        c = client.chat.completions.create(model=model, max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": "1 + 1"},
            {"role": "assistant", "content": "The answer is", "prefix": True, "reasoning_content": ""}])
        assert [b.type for b in m.content] == ["text"] and m.content[0].text == c.choices[0].message.content


def test_json_output_validates(claude):
    """output_config.format, and the structured-outputs beta's output_format (litellm's anthropic/ response_format
    sends it; it was ignored, and a free-text reply came back)."""
    schema = Town.model_json_schema() | {"additionalProperties": False}
    fmt = {"type": "json_schema", "schema": schema}
    for asked in ({"output_config": {"format": fmt, "effort": "low"}}, {"extra_body": {"output_format": fmt}}):
        m = claude.messages.create(model="deepseek-chat", max_tokens=120, messages=[{"role": "user", "content": "A town?"}],
                                   **asked)
        jsonschema.validate(json.loads(m.content[0].text), schema)


def test_claude_names_are_the_first_model_and_models_are_listed(claude):
    m = claude.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "Hi."}],
                               extra_body=GREEDY)
    assert m.model == "claude-sonnet-4-5" and m.content[0].type == "thinking"  # the first model: it thinks
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="gpt-4o", max_tokens=1, messages=[{"role": "user", "content": "Hi."}])
    assert e.value.body["error"]["type"] == "not_found_error" and "gpt-4o" in e.value.body["error"]["message"]
    assert [m.id for m in claude.models.list()] == ["tiny-v3", "deepseek-reasoner", "deepseek-chat"]
    card = claude.models.retrieve("claude-opus-4-1")
    assert card.id == "claude-opus-4-1" and card.max_input_tokens == 1024


def test_the_key_as_x_api_key(server, monkeypatch):
    """x-api-key, as Anthropic's clients send it, or the Bearer header; a wrong or missing key is a 401 in Anthropic's
    shape here, in OpenAI's on the OpenAI routes."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    ask = dict(model="deepseek-chat", max_tokens=1, messages=[{"role": "user", "content": "Hi."}])
    keyed = anthropic.Anthropic(base_url=server + "/anthropic", default_headers={"x-api-key": KEY}, max_retries=0)
    assert keyed.messages.create(**ask).content
    wrong = anthropic.Anthropic(base_url=server + "/anthropic", default_headers={"x-api-key": "sk-wrong"},
                                max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(**ask)
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error", "message": "incorrect API key"}}
    r = httpx.post(server + "/anthropic/v1/messages", json=ask)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "x-api-key" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/chat/completions", json={"messages": ask["messages"]}, headers={"x-api-key": "no"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and "type" not in r.json()
    assert httpx.get(server + "/anthropic/v1/nosuch", headers={"x-api-key": KEY}).json()["error"]["type"] == \
        "not_found_error"


def test_claude_codes_billing_line_is_left_out_of_the_prompt(claude):
    """Claude Code opens every system prompt with a billing line whose hash changes at each request: left in, no two
    requests would share a prefix (the prefix cache never hit); it is dropped, as a block or a line of the text."""
    ask = dict(model="deepseek-chat", messages=[{"role": "user", "content": "Hi."}])
    plain = claude.messages.count_tokens(**ask, system="Be brief.").input_tokens
    for nonce in ("36ee5", "0aaa9"):
        line = f"x-anthropic-billing-header: cc_version=2.1.177.01c; cc_entrypoint=cli; cch={nonce};"
        as_block = [{"type": "text", "text": line}, {"type": "text", "text": "Be brief."}]
        assert claude.messages.count_tokens(**ask, system=as_block).input_tokens == plain
        assert claude.messages.count_tokens(**ask, system=f"{line}\nBe brief.").input_tokens == plain
    mention = "Be brief. (x-anthropic-billing-header: not at a line's start, kept)"
    assert claude.messages.count_tokens(**ask, system=mention).input_tokens > plain


def test_messages_are_answered_at_the_root_too(server, claude):
    """A tool pointed at the server's root (ANTHROPIC_BASE_URL=http://host:port, as for vLLM's and llama.cpp's servers)
    gets the same messages, token counts and Anthropic-shaped errors; the root's /v1/models stays OpenAI's."""
    rooted = anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)
    ask = dict(model="deepseek-chat", max_tokens=6, messages=[{"role": "user", "content": "Say something."}],
               extra_body=GREEDY)
    assert blocks(rooted.messages.create(**ask)) == blocks(claude.messages.create(**ask))
    count = dict(model="deepseek-chat", messages=ask["messages"])
    assert rooted.messages.count_tokens(**count).input_tokens == claude.messages.count_tokens(**count).input_tokens
    with pytest.raises(anthropic.BadRequestError) as e:
        rooted.messages.create(**{**ask, "max_tokens": 0})
    assert e.value.body["type"] == "error" and "max_tokens" in e.value.body["error"]["message"]
    assert httpx.get(server + "/v1/models", headers={"x-api-key": KEY}).json()["object"] == "list"


LONG = "word " * 2000  # over the tiny model's context of 1,024 tokens
USED = [{"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1}}]}]


@pytest.mark.parametrize("body,field,text", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type":
      "image/png", "data": "AAAA"}}]}]}, "messages.0.content.0.type", "'image'"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages.0.content.0.type",
     "'document'"),
    ({"messages": [*USED, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                          "content": [{"type": "image", "source": {}}]}]}]},
     "messages.2.content.0.content", "image"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type", "web_search_20250305"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools.0.type", "bash_20250124"),
    ({"tools": [{"name": "f", "input_schema": {"type": "array"}}]}, "tools.0.input_schema", "object"),
    ({"max_tokens": None}, "max_tokens", "required"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"max_tokens": 900, "messages": [{"role": "user", "content": LONG}]}, "messages", "context"),
    ({"messages": []}, "messages", "messages"),
    ({"messages": [{"role": "tool", "content": "5"}]}, "messages.0.role", "'user'"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "3"}]}]},
     "messages.0.content.0.tool_use_id", "toolu_9"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "messages.0.content.0.type", "tool_use"),
    ({"messages": USED}, "messages.1", "tool_result"),
    ({"system": [{"type": "image", "source": {}}]}, "system.0.type", "image"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nosuch"}}, "tool_choice", "nosuch"),
    ({"tool_choice": {"type": "any"}}, "tool_choice", "'any'"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool"}}, "tool_choice.name", "required"),
    ({"thinking": {"type": "sometimes"}}, "thinking.type", "enabled"),
    ({"stop_sequences": [""]}, "stop_sequences", "non-empty"),
    ({"temperature": 3}, "temperature", "temperature"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema", "required"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {}}}, "output_format": {"type": "json_schema",
                                                                                           "schema": {}}},
     "output_format", "once"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object", "properties": {
        "a": {"type": 7}}}}}}, "output_config.format", "output_config.format"),
])
def test_what_is_not_served_is_a_400_in_anthropics_shape_naming_the_field(server, body, field, text):
    request = {"model": "deepseek-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], **body}
    r = post(server, {k: v for k, v in request.items() if v is not None})
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
    assert error["error"]["message"].startswith(field) and text in error["error"]["message"], error


def test_the_sdk_raises_a_bad_request(claude):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="deepseek-chat", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}])
    assert e.value.body["error"]["message"].startswith("messages.0.content.0.type")


@pytest.mark.parametrize("body", [
    [1, 2], "text", {"messages": "x", "max_tokens": 1}, {"model": 5, "messages": [], "max_tokens": 1},
    {"max_tokens": 1, "messages": [{"role": "user"}]},
    {"max_tokens": 1, "messages": [{"role": "user", "content": [{"type": 5}]}]},
    {"max_tokens": 1, "messages": [{"role": "user", "content": [5, None]}]},
    {"max_tokens": 1, "messages": [{"role": "assistant", "content": [{"type": "tool_use"}]}]},
    {"max_tokens": 1, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "", "name": "f",
                                                                      "input": {}}]}]},
    {"max_tokens": 1, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f",
                                                                      "input": [1]}]}]},
    {"max_tokens": 1, "messages": [*USED, {"role": "user", "content": [{"type": "tool_result",
                                                                         "tool_use_id": "toolu_1", "content": [7]}]}]},
    {"max_tokens": 1, "system": 5, "messages": [{"role": "user", "content": "x"}]},
    {"max_tokens": 1, "tools": [{"name": "x"}], "messages": [{"role": "user", "content": "x"}]},
    {"max_tokens": 1, "tools": [{"name": "a b", "input_schema": {}}], "messages": [{"role": "user", "content": "x"}]},
    {"max_tokens": 1, "tool_choice": "auto", "messages": [{"role": "user", "content": "x"}]},
    {"max_tokens": 1, "thinking": {"type": "enabled", "budget_tokens": "many"}, "messages": [
        {"role": "user", "content": "x"}]},
    {"max_tokens": 1, "stream": "yes", "messages": [{"role": "user", "content": "x"}]},
    {"max_tokens": 1, "top_k": -1, "messages": [{"role": "user", "content": "x"}]},
    {"max_tokens": 1, "messages": [{"role": "user", "content": "\ud800"}]},
])
def test_malformed_bodies_are_4xx_in_anthropics_shape_never_500(server, body):
    sampling = isinstance(body, dict) and {"stream", "top_k"} & body.keys()  # fields count_tokens does not read
    for path in ("/messages",) if sampling else ("/messages", "/messages/count_tokens"):
        r = post(server, body, path)
        assert 400 <= r.status_code < 500 and r.json()["type"] == "error", (path, r.text)


def test_a_failure_once_the_stream_has_started_is_an_error_event(server, claude, monkeypatch):
    """llguidance gives up on this schema after the first token: a 400 before anything is sent, or, once a stream has
    opened (past FIRST_EVENT_WAIT), an `error` event that ends it, never a message_stop."""
    loop = {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}},
                                                 "required": ["c"]}}}
    request = dict(model="deepseek-chat", max_tokens=20, messages=[{"role": "user", "content": "JSON"}],
                   output_config={"format": {"type": "json_schema", "schema": loop}})
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError, match=r"output_config.format or tools\) cannot be followed"):
            streamed(claude, **request) if stream else claude.messages.create(**request)
    monkeypatch.setattr(server_module, "FIRST_EVENT_WAIT", 0.0)
    with httpx.stream("POST", server + "/anthropic/v1/messages", json={**request, "stream": True},
                      headers={"x-api-key": KEY}) as r:
        frames = r.read().decode().strip().split("\n\n")
    assert frames[-1].startswith("event: error\ndata: ") and "message_stop" not in frames[-1]
    error = json.loads(frames[-1].split("data: ", 1)[1])
    assert error["type"] == "error" and "cannot be followed" in error["error"]["message"]
    with pytest.raises(anthropic.APIStatusError, match="cannot be followed"):
        streamed(claude, **request)


def test_a_message_thread_is_refused_as_the_sdk_expects_and_its_tool_runner_sends_the_whole_conversation(server, claude):
    """The SDK's message threads (its tool runner's default) send only the new messages, the server to keep the rest:
    `thread` was ignored, so later turns came without their history (the runner's second turn: 400 'any' needs tools).
    Refused with the error code the SDK reads, its runner goes on without a thread."""
    r = post(server, {"model": "deepseek-chat", "max_tokens": 4, "messages": ASK, "thread": {"type": "create"}})
    error = r.json()["error"]
    assert r.status_code == 400 and error["details"] == {"error_code": "thread_unsupported_request"}, r.text
    assert error["message"].startswith("thread")
    runner = claude.beta.messages.tool_runner(
        model="deepseek-chat", max_tokens=60, tools=[anthropic.beta_tool(add)], tool_choice={"type": "any"},
        messages=ASK, max_iterations=2, extra_body=GREEDY)
    replies = list(runner)
    assert len(replies) == 2 and all(m.stop_reason in ("tool_use", "max_tokens") for m in replies)
    assert prompt_tokens(replies[1].usage) > prompt_tokens(replies[0].usage)  # the first turn and its result in it


def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


def test_between_tools_thinks_and_omitted_thinking_has_no_text(claude):
    request = dict(model="deepseek-chat", max_tokens=8, messages=[{"role": "user", "content": "Hi."}], extra_body=GREEDY)
    m = claude.messages.create(thinking={"type": "between_tools"}, **request)
    assert m.content[0].type == "thinking" and m.content[0].thinking
    omitted = {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}
    m = claude.messages.create(thinking=omitted, **request)
    assert m.content[0].type == "thinking" and m.content[0].thinking == ""
    events, final = streamed(claude, thinking=omitted, **request)
    check_events(events)
    assert not [e for e in events if e.type == "content_block_delta" and e.delta.type == "thinking_delta"]
    assert final.content[0].type == "thinking" and final.content[0].thinking == ""


@pytest.mark.parametrize("messages,text", [
    ([*USED, {"role": "user", "content": "and?"}], "messages.2: the tool_use ids toolu_1"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {}},
        {"type": "tool_use", "id": "toolu_2", "name": "add", "input": {}}]},
      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "1"}]}],
     "messages.2: the tool_use ids toolu_2"),
    ([{"role": "user", "content": ""}], "messages.0.content: is empty"),
    ([{"role": "user", "content": []}], "messages.0.content: is empty"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {}},
        {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {}}]}], "messages.1.content.1.id"),
])
def test_a_tool_use_without_its_result_or_an_empty_message_is_refused_as_anthropic_does(server, messages, text):
    r = post(server, {"model": "deepseek-chat", "max_tokens": 4, "tools": TOOLS, "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(text), r.text


def test_models_are_listed_a_page_at_a_time(claude, server):
    every = [m.id for m in claude.models.list()]
    first = claude.models.list(limit=1)
    assert [m.id for m in first.data] == every[:1] and first.has_more and first.last_id == every[0]
    assert [m.id for m in claude.models.list(limit=1)] == every  # the SDK's iterator pages on
    assert [m.id for m in claude.models.list(before_id=every[-1], limit=5).data] == every[:-1]
    r = httpx.get(f"{server}/anthropic/v1/models", params={"after_id": "nosuch"}, headers={"x-api-key": KEY})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_a_body_over_the_limit_is_anthropics_request_too_large(server, monkeypatch):
    r = httpx.post(f"{server}/anthropic/v1/messages", content=b" " * (9 * 2**20),
                   headers={"x-api-key": KEY, "content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
