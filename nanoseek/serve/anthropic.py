"""Anthropic's Messages API, under /anthropic as DeepSeek serves it (https://api.deepseek.com/anthropic), so the
anthropic SDK, Claude Code and other Anthropic-format tools work with `ANTHROPIC_BASE_URL=http://HOST:PORT/anthropic`.

A request is a chat completion in another shape: it is translated into a ChatRequest and served by the chat route's
own functions (prompt, tools, tool_choice, grammar, sampling, reasoning split, usage, errors), and the chat's reply,
or its stream's chunks, are translated back into Anthropic's message and events. Routes: POST /anthropic/v1/messages,
POST /anthropic/v1/messages/count_tokens (both also at the root: AT_THE_ROOT), GET /anthropic/v1/models[/{id}]. Any
claude-* model name is served by the first model, as DeepSeek maps them onto its own. Every error on these routes is in
Anthropic's shape (AnthropicErrors), the key may come as `x-api-key` (guard.Guard), and what cannot be served (images, documents,
Anthropic's own tools) is a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import Field, field_validator, model_validator

from .protocol import (MAX_MESSAGES, APIError, ChatRequest, Function, JsonSchema, NamedFunction, NamedToolChoice,
                       ResponseFormat, StrictBody, Thinking, Tool, check_tools, new_id, now, null_is_the_default,
                       part_texts)
from .server import (ALIASES, Models, Service, _chat_job, _chat_stream, _named, _reply, _sse, _wait_all,
                     in_terms)
from .server import _usage as _chat_usage

BASE = "/anthropic"  # the base URL's path: the SDK posts to BASE + /v1/messages
# messages are also answered at the root, where vLLM's and llama.cpp's servers answer them (a tool pointed at
# http://host:port with no /anthropic); the root's /v1/models stays OpenAI's
AT_THE_ROOT = ("/v1/messages", "/v1/messages/count_tokens")

# ---- requests ----
BLOCK_FIELDS = {"text": ("text",), "tool_use": ("id", "name", "input"), "tool_result": ("tool_use_id",),
                "thinking": (), "redacted_thinking": ()}  # each block type's required fields
BLOCKS_OF = {"user": ("text", "tool_result"), "system": ("text",),  # the block types each role's messages hold
             "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}
CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # Anthropic's tool_choice types as chat's
# the line Claude Code puts first in every system prompt: a hash that changes at each request (cch=...), so kept it
# would make every request's prompt new from its first tokens and defeat the prefix cache; it tells the model nothing
# (vLLM and SGLang drop it too)
BILLING_LINE = re.compile(r"^x-anthropic-billing-header:[^\n]*(\n|$)", re.MULTILINE)


class ContentBlock(StrictBody):
    """One block of a message's content: its `type` says which of the other fields it holds. Thinking blocks are read
    and dropped (DeepSeek's templates drop earlier turns' reasoning); images and documents cannot be read by these
    models."""
    type: str
    text: str | None = None
    id: str | None = Field(None, min_length=1)  # tool_use
    name: str | None = None
    input: dict | None = None
    tool_use_id: str | None = Field(None, min_length=1)  # tool_result
    content: str | list | None = None
    is_error: bool | None = None  # accepted: a failed tool's result says so in its text, which the model reads

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        if self.type not in BLOCK_FIELDS:
            raise ValueError(f"type: {self.type!r} blocks are not supported; messages hold text, tool_use, "
                             "tool_result, thinking and redacted_thinking blocks (these models read text only)")
        for field in BLOCK_FIELDS[self.type]:
            if getattr(self, field) is None:
                raise ValueError(f"{field}: is required in a {self.type} block")
        if isinstance(self.content, list):
            try:
                self.content = part_texts(self.content, ("text",), "\n")  # a block a line, as _text
            except ValueError as e:
                raise ValueError(f"content: {e}") from None
        return self


class AnthropicMessage(StrictBody):
    role: Literal["user", "assistant", "system"]  # (the anthropic SDK's MessageParam has system messages too)
    content: str | list[ContentBlock]


class AnthropicTool(StrictBody):
    """A tool the client runs, defined by its input schema. Anthropic's own tools (web_search, bash, computer,
    text_editor...) run on Anthropic's servers or are built into Claude: refused."""
    type: Literal["custom"] | None = None
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _custom_only(cls, data):
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):  # checked first: these have no schema
            raise ValueError(f"type: {data['type']!r} is one of Anthropic's own tools, which are not served here; "
                             "define the tool with name, description and input_schema")
        return data

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, v):
        if v.get("type", "object") != "object":
            raise ValueError("must be a JSON schema of type 'object'")
        return v


class AnthropicToolChoice(StrictBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self):
        if self.type == "tool" and self.name is None:
            raise ValueError("name: is required when type is 'tool'")
        return self


class ThinkingConfig(StrictBody):
    """enabled (or between_tools: thinking between tool calls too, which DeepSeek's thinking does) turns thinking on,
    disabled off; adaptive (the model decides) leaves the model's default. display "omitted" sends the thinking
    blocks without their text, as Anthropic does."""
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=0)  # accepted, as DeepSeek does: max_tokens bounds the reasoning
    display: Literal["summarized", "omitted"] | None = None  # summarized: the whole reasoning (none is summarized)


class OutputFormat(StrictBody):
    type: Literal["json_schema"]
    schema_: dict = Field(..., alias="schema")


class OutputConfig(StrictBody):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # accepted; a model this size has no say
    format: OutputFormat | None = None  # chat's response_format


class CountTokensRequest(StrictBody):
    """What a message's prompt is made of (count_tokens takes this much; a message request adds sampling)."""
    model: str | None = None
    messages: list[AnthropicMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    system: str | list[ContentBlock] | None = None
    tools: list[AnthropicTool] | None = Field(None, max_length=128)
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's form of output_config.format (litellm's)
    thread: dict | None = None  # the SDK's message threads (the server keeps the conversation): refused, see _unthreaded

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        return null_is_the_default(data)

    @model_validator(mode="after")
    def _a_conversation_chat_can_hold(self):
        """Each block in a message of its role, each tool result after the tool_use it answers, a tool choice the tools
        allow, and no tool_use left for the reply to answer: what chat would refuse in its own terms, named in these."""
        if self.output_format and self.output_config and self.output_config.format:
            raise ValueError("output_format: give the format once, as output_config.format (output_format is the "
                             "structured-outputs beta's name for it)")
        choice = self.tool_choice
        names = [t.name for t in self.tools or []]
        check_tools(names, None, choice.name if choice and choice.type == "tool" else None)
        if choice and choice.type == "any" and not names:
            raise ValueError("tool_choice: 'any' needs tools")
        for k, block in enumerate(self.system if isinstance(self.system, list) else []):
            if block.type != "text":
                raise ValueError(f"system.{k}.type: the system prompt holds text blocks only, not {block.type!r}")
        called, unanswered = set(), {}
        for i, m in enumerate(self.messages):
            if not m.content and not (m.role == "assistant" and i == len(self.messages) - 1):
                raise ValueError(f"messages.{i}.content: is empty; every message but a last assistant one (a "
                                 "prefill) needs content")
            answered = {b.tool_use_id for b in m.content if b.type == "tool_result"} if isinstance(m.content, list) else set()
            if missing := [t for t in unanswered if t not in answered]:
                raise ValueError(f"messages.{i}: the tool_use ids {', '.join(missing)} of messages.{i - 1} have no "
                                 "tool_result here; each tool_use needs its tool_result in the next message")
            unanswered = {}
            for k, block in enumerate(m.content if isinstance(m.content, list) else []):
                where = f"messages.{i}.content.{k}"
                if block.type not in BLOCKS_OF[m.role]:
                    raise ValueError(f"{where}.type: {m.role} messages hold {', '.join(BLOCKS_OF[m.role])} blocks, "
                                     f"not {block.type}")
                if block.type == "tool_use":
                    if block.id in called:
                        raise ValueError(f"{where}.id: {block.id!r} is the id of an earlier tool_use block")
                    called.add(block.id)
                    unanswered[block.id] = k
                elif block.type == "tool_result" and block.tool_use_id not in called:
                    raise ValueError(f"{where}.tool_use_id: {block.tool_use_id!r} answers no tool_use block of an "
                                     "earlier assistant message")
        last = self.messages[-1]
        if last.role == "assistant" and isinstance(last.content, list) and any(b.type == "tool_use"
                                                                               for b in last.content):
            raise ValueError(f"messages.{len(self.messages) - 1}: the conversation ends with the model's tool_use; "
                             "send the results as tool_result blocks in a user message")
        return self

    def chat_messages(self) -> list[dict]:
        """The conversation as chat messages: the system prompt first (less Claude Code's billing line); a user message's
        tool results as tool messages
        (before its text, where Anthropic puts them); an assistant message's tool_use blocks as its tool_calls; thinking
        dropped. A last assistant message is a prefill the reply continues: chat's prefix completion, answering without
        reasoning (reasoning_content "")."""
        system = BILLING_LINE.sub("", self.system if isinstance(self.system, str) else _text(self.system or []))
        msgs = [{"role": "system", "content": system}] if system else []
        for m in self.messages:
            msgs += _chat_turn(m)
        if self.messages[-1].role == "assistant":
            msgs[-1] |= {"prefix": True, "reasoning_content": ""}
        if len(msgs) > MAX_MESSAGES:
            raise APIError(400, f"messages: the conversation makes {len(msgs)} chat messages (each tool result is "
                                f"one), over {MAX_MESSAGES}", param="messages")
        return msgs

    def chat_request(self, **sampling) -> ChatRequest:
        """The chat completion this asks for: tools as functions, tool_choice any as 'required', the thinking type as
        chat's (adaptive, or none given: the model's default), output_config.format as response_format."""
        choice, fmt = self.tool_choice, (self.output_config and self.output_config.format) or self.output_format
        return ChatRequest(
            messages=self.chat_messages(),
            thinking=None if self.thinking is None or self.thinking.type == "adaptive" else Thinking(
                type="disabled" if self.thinking.type == "disabled" else "enabled"),
            tools=[Tool(type="function", function=Function(name=t.name, description=t.description,
                                                           parameters=t.input_schema, strict=t.strict))
                   for t in self.tools] if self.tools else None,
            tool_choice=None if choice is None else CHOICES.get(choice.type) or NamedToolChoice(
                type="function", function=NamedFunction(name=choice.name)),
            parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
            response_format=fmt and ResponseFormat(type="json_schema", json_schema=JsonSchema(schema=fmt.schema_)),
            **sampling)


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages. metadata, service_tier, container, mcp_servers... are ignored, as DeepSeek ignores them."""
    max_tokens: int = Field(..., ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=16)
    temperature: float | None = Field(None, ge=0, le=2)  # DeepSeek's range (Anthropic's is [0, 1])
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty(cls, v):
        if v and not all(v):
            raise ValueError("each stop sequence must be a non-empty string")
        return v

    def chat_request(self, **sampling) -> ChatRequest:
        return super().chat_request(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                    stop=self.stop_sequences, **sampling)


def _text(blocks: list[ContentBlock]) -> str:
    """The text blocks among `blocks` as one text, a block a line (as vLLM joins a message's text parts: Claude Code
    sends a reminder and the question as two blocks)."""
    return "\n".join(b.text for b in blocks if b.type == "text")


def _chat_turn(m: AnthropicMessage) -> list[dict]:
    """One message as the chat messages it makes."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    text = _text(m.content)
    if m.role == "assistant":
        calls = [{"id": b.id, "type": "function",
                  "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
                 for b in m.content if b.type == "tool_use"]
        return [{"role": "assistant", "content": text or None, "tool_calls": calls} if calls else
                {"role": "assistant", "content": text}]
    results = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.content or ""}
               for b in m.content if b.type == "tool_result"]
    return results + ([{"role": m.role, "content": text}] if text or not results else [])


# ---- errors ----
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 503: "overloaded_error"}


ERROR_CODES = {"thread_unsupported_request"}  # the codes of Anthropic's own errors (the others are OpenAI's)


def error_body(e: APIError) -> dict:
    """An error in Anthropic's shape, which has no `param`: the message names the field instead; an error of Anthropic's
    own code says it in its details, where the anthropic SDK reads it."""
    kind = ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    message = e.message if not e.param or e.param in e.message else f"{e.param}: {e.message}"
    return {"type": "error", "error": {"type": kind, "message": message,
                                       **({"details": {"error_code": e.code}} if e.code in ERROR_CODES else {})}}


# chat's field names as this API names them (the others chat's errors name, messages, max_tokens, tools, tool_choice,
# temperature, top_p, top_k, are named alike)
ANTHROPIC_TERMS = {"response_format": "output_config.format"}


class AnthropicErrors:
    """ASGI middleware, outside the Guard: an error answered under BASE or AT_THE_ROOT (by the Guard, the router or a
    route, all in
    OpenAI's shape) is sent in Anthropic's, {"type": "error", "error": {"type", "message"}}, which the anthropic SDK
    and Claude Code read. The other routes keep OpenAI's."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == BASE or path.startswith(BASE + "/") or path in AT_THE_ROOT):
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def sending(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is whole
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                body = _reshaped(start["status"], b"".join(chunks))
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, sending)


def _reshaped(status: int, body: bytes) -> bytes:
    """An OpenAI-shaped error body in Anthropic's shape (any other body as it is: a hang-up's empty 499)."""
    try:
        error = json.loads(body)["error"]
        e = APIError(status, error["message"], param=error.get("param"), code=error.get("code"))
    except (ValueError, KeyError, TypeError):
        return body
    return json.dumps(error_body(e), ensure_ascii=False).encode()


# ---- replies ----
def _pick(models: Models, model: str | None) -> tuple[Service, bool]:
    """The model a request names and whether it thinks by default: claude-* names are the first model's own (DeepSeek
    maps them onto its models), any other name as chat picks it."""
    return models.pick(None if model and model.startswith("claude") else model)




def _anthropic_usage(u: dict) -> dict:
    """Chat's usage in Anthropic's terms, where the whole prompt is input_tokens + cache_read_input_tokens (+
    cache_creation_input_tokens, which the prefix cache does not charge for)."""
    return {"input_tokens": u["prompt_cache_miss_tokens"], "output_tokens": u["completion_tokens"],
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": u["prompt_cache_hit_tokens"]}


def _stop(req, finish: str, asked: int) -> dict:
    """Anthropic's stop_reason and stop_sequence for a chat reply's finish_reason; a reply cut short whose max_tokens
    was cut to what the context left (create_message) stopped at the context's end."""
    if finish == "tool_calls":
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if finish == "length":
        cut = req.params.max_new_tokens < asked
        return {"stop_reason": "model_context_window_exceeded" if cut else "max_tokens", "stop_sequence": None}
    return {"stop_reason": "end_turn" if req.stop_string is None else "stop_sequence", "stop_sequence": req.stop_string}


def _thinking_block(text: str) -> dict:  # unsigned: earlier reasoning sent back is dropped, never checked
    return {"type": "thinking", "thinking": text, "signature": ""}


def _text_block(text: str) -> dict:
    return {"type": "text", "text": text}


def _tool_use_block(call_id: str, name: str, arguments: dict) -> dict:
    """A chat tool call as a tool_use block, its id in Anthropic's form (call_X -> toolu_X)."""
    return {"type": "tool_use", "id": "toolu_" + call_id.removeprefix("call_"), "name": name, "input": arguments}


def _content(msg: dict, omit_thinking: bool) -> list[dict]:
    """A chat reply's message as content blocks: its reasoning (without its text when omitted), its text, its calls."""
    blocks = [_thinking_block("" if omit_thinking else msg["reasoning_content"])] if msg.get("reasoning_content") else []
    if msg.get("content"):
        blocks.append(_text_block(msg["content"]))
    return blocks + [_tool_use_block(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for c in msg.get("tool_calls") or []]


async def create_message(svc: Service, thinks: bool, body: MessagesRequest, request: Request):
    """A message by `svc`'s model, thinking by default when `thinks`: the chat completion the request translates to
    (MessagesRequest.chat_request), its reply as content blocks, or its stream as Anthropic's events. A max_tokens over
    what the context leaves is cut to it, as Anthropic's API does for its newer models (the reply then stops with
    model_context_window_exceeded): Claude Code asks for 32,000 tokens whatever the model, which chat refuses on a
    small context."""
    chat_body = body.chat_request()
    omit = body.thinking is not None and body.thinking.display == "omitted"
    head = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": body.model or svc.name}
    try:
        prompt, params, started, with_calls, continued = await asyncio.to_thread(_chat_job, svc, thinks, chat_body)
        params = replace(params, max_new_tokens=svc.engine.fitting(len(prompt), body.max_tokens),
                         top_k=params.top_k if body.top_k is None else body.top_k)
        jobs = svc.submit(prompt, params, 1, asyncio.get_running_loop())
        req = jobs[0][0]
        if body.stream:
            events = _MessageEvents(head, lambda: _anthropic_usage(_chat_usage(svc, prompt, jobs, started)),
                                    lambda finish: _stop(req, finish, body.max_tokens), omit)
            chunks = _chat_stream(svc, jobs, request, head["id"], now(), head["model"], started, prompt, True,
                                  with_calls, continued)
            return await _sse(events.translate(chunks), request, frame=_named, failed=_error_event, done=None)
        await _wait_all(svc, jobs, request)
    except APIError as e:
        raise in_terms(e, ANTHROPIC_TERMS) from None
    msg, finish = _reply(svc, req, started, with_calls, continued)
    return {**head, "content": _content(msg, omit), **_stop(req, finish, body.max_tokens),
            "usage": _anthropic_usage(_chat_usage(svc, prompt, jobs, started))}


def _error_event(e: APIError) -> dict:
    """A failure once the stream has started: Anthropic's `error` event."""
    return error_body(in_terms(e, ANTHROPIC_TERMS))


EMPTY = {"thinking": _thinking_block, "text": _text_block}  # a block as content_block_start opens it, given ""


class _MessageEvents:
    """Anthropic's stream, from a chat stream's chunks (_chat_stream's, with usage): message_start, then each stretch of
    reasoning, text or call as a content block (content_block_start, its deltas, content_block_stop), then message_delta
    with the stop reason and the usage, and message_stop. `usage()` is the usage so far (for message_start), `stop` the
    stop reason and sequence of a finish_reason; `omit_thinking`: thinking blocks without their deltas."""

    def __init__(self, head: dict, usage: Callable[[], dict], stop: Callable[[str], dict], omit_thinking: bool = False):
        self.head, self.usage, self.stop, self.omit_thinking = head, usage, stop, omit_thinking
        self.index = -1  # the block being written, or the last one written
        self.kind: str | None = None  # its type while it is open

    async def translate(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        started, finish, usage = False, None, None
        async for chunk in chunks:
            if not started:  # (the chat stream's first chunk comes once generation has started)
                started = True
                yield {"type": "message_start", "message": {**self.head, "content": [], "stop_reason": None,
                                                            "stop_sequence": None, "usage": self.usage()}}
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                finish = choice["finish_reason"] or finish
                for e in self.delta(choice["delta"]):
                    yield e
        for e in self.close():
            yield e
        yield {"type": "message_delta", "delta": self.stop(finish), "usage": _anthropic_usage(usage)}
        yield {"type": "message_stop"}

    def delta(self, delta: dict) -> Iterator[dict]:
        if text := delta.get("reasoning_content"):
            yield from self.write("thinking", None if self.omit_thinking else {"type": "thinking_delta", "thinking": text})
        if text := delta.get("content"):
            yield from self.write("text", {"type": "text_delta", "text": text})
        for call in delta.get("tool_calls") or []:
            if "id" in call:  # a call's first delta opens its block
                yield from self.open(_tool_use_block(call["id"], call["function"]["name"], {}))
            if more := call["function"].get("arguments"):
                yield self.block_delta({"type": "input_json_delta", "partial_json": more})

    def write(self, kind: str, delta: dict | None) -> Iterator[dict]:
        if self.kind != kind:
            yield from self.open(EMPTY[kind](""))
        if delta is not None:
            yield self.block_delta(delta)

    def block_delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def open(self, block: dict) -> Iterator[dict]:
        yield from self.close()
        self.index, self.kind = self.index + 1, block["type"]
        yield {"type": "content_block_start", "index": self.index, "content_block": block}

    def close(self) -> Iterator[dict]:
        if self.kind is not None:
            yield {"type": "content_block_stop", "index": self.index}
            self.kind = None


def _unthreaded(body: CountTokensRequest) -> None:
    """A request in one of the SDK's message threads (only its new messages, the server to hold the rest) is refused as
    the SDK expects a server without threads to refuse it: its tool runner then sends the whole conversation again."""
    if body.thread is not None:
        raise APIError(400, "thread: message threads are not served here (the server keeps no conversation): send the "
                            "whole conversation in messages", param="thread", code="thread_unsupported_request")


# ---- routes ----
def routes(models: Models) -> APIRouter:
    """The routes under BASE: messages, count_tokens, and the served models in Anthropic's form; the first two
    AT_THE_ROOT too."""
    api, messaging = APIRouter(prefix=BASE + "/v1"), APIRouter()
    started = datetime.fromtimestamp(now(), timezone.utc).isoformat()  # the models' created_at (see create_app)

    def card(model: str) -> dict:
        context = _pick(models, model)[0].engine.max_len  # (a name not served: a 404)
        return {"type": "model", "id": model, "display_name": model, "created_at": started, "lifecycle": "active",
                "max_input_tokens": context, "max_tokens": context}

    @messaging.post("/messages")
    async def messages(body: MessagesRequest, request: Request):
        _unthreaded(body)
        return await create_message(*_pick(models, body.model), body, request)

    @messaging.post("/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest):
        """The prompt a message request would send, counted: the same ChatRequest, rendered by the same function."""
        _unthreaded(body)
        svc, thinks = _pick(models, body.model)
        try:
            prompt = (await asyncio.to_thread(_chat_job, svc, thinks, body.chat_request()))[0]
        except APIError as e:
            raise in_terms(e, ANTHROPIC_TERMS) from None
        return {"input_tokens": len(prompt)}

    @api.get("/models")
    async def list_models(limit: int = Query(20, ge=1, le=1000), after_id: str | None = None,
                          before_id: str | None = None):
        """A page of the served names (Anthropic's paging: the `limit` after after_id, or before before_id)."""
        names = [*models.by_name, *ALIASES]
        for given in (after_id, before_id):
            if given is not None and given not in names:
                raise APIError(404, f"no model {given!r} here; served: {', '.join(names)}")
        if before_id is not None:
            end = names.index(before_id)
            page, more = names[max(0, end - limit):end], end > limit
        else:
            start = 0 if after_id is None else names.index(after_id) + 1
            page, more = names[start:start + limit], start + limit < len(names)
        return {"data": [card(m) for m in page], "has_more": more, "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None}

    @api.get("/models/{model:path}")
    async def model_card(model: str):
        return card(model)

    api.include_router(messaging)
    both = APIRouter()
    both.include_router(api)
    both.include_router(messaging, prefix="/v1")
    return both
