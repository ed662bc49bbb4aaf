"""Request and response shapes of the OpenAI / DeepSeek API (pydantic), and OpenAI-style errors.

Unknown request fields are ignored (clients send many optional ones); known fields are
validated strictly (a JSON string is no number or boolean: `"stream": "yes"` is refused) with
ranges, text must be valid Unicode (no lone UTF-16 surrogate such as `"\\ud800"`), and every
failure becomes a 400 with a message naming the field, never pydantic's own error dump.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..tokenizer import TEMPLATE_NAMES, THINKING_NAMES


class APIError(Exception):
    """An error answered as OpenAI's {"error": {...}} body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_MESSAGES = 10_000  # in one request's list of messages (chat completions, a stored conversation)
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can write one alone ("\\ud800"); no UTF-8 text can hold it


def lone_surrogate(value, path: str = "") -> str | None:
    """The path of the first string (or object key) in a JSON value that holds a lone surrogate; None if none."""
    if isinstance(value, str):
        return (path or "body") if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        key = str(k).encode("utf-8", "backslashreplace").decode()  # the path is shown: surrogates escaped
        here = f"{path}.{key}" if path else key
        if isinstance(k, str) and _SURROGATE.search(k):
            return here
        if (found := lone_surrogate(v, here)) is not None:
            return found
    return None


class StrictBody(BaseModel):
    """A JSON request body: unknown fields ignored, known ones strictly typed, only valid Unicode."""
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        try:  # the common case at C speed: a body of valid Unicode encodes as UTF-8
            json.dumps(data, ensure_ascii=False, default=str).encode("utf-8")
            return data
        except UnicodeEncodeError:
            pass
        if (where := lone_surrogate(data)) is not None:
            raise ValueError(f"{where}: the text holds a lone UTF-16 surrogate, which is not valid Unicode")
        return data


class FunctionCall(StrictBody):
    name: str
    arguments: str


class ToolCall(StrictBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


LEGACY_CALL = "call_function_"  # a deprecated function call's id, and its result's: the function's name follows


class Message(StrictBody):
    role: Literal["system", "user", "assistant", "developer", "tool"]  # and OpenAI's deprecated "function"
    content: str | list[dict] | None = None
    reasoning_content: str | None = None
    prefix: bool = False  # DeepSeek chat prefix completion: the model continues this assistant message
    name: str | None = None

    @field_validator("prefix", mode="before")
    @classmethod
    def _null_prefix(cls, v):
        return False if v is None else v  # null: not a prefix (as the request's nullable fields)
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="before")
    @classmethod
    def _legacy_function_turns(cls, data):
        """OpenAI's deprecated function turns as tool turns: an assistant message's `function_call` as its one tool
        call, a "function" message (its `name` says which function answered) as that call's result."""
        if not isinstance(data, dict):
            return data
        if data.get("role") == "function":
            if not isinstance(data.get("name"), str) or not data["name"]:
                raise ValueError("name: a function message must name the function whose result it is")
            return {**data, "role": "tool", "tool_call_id": LEGACY_CALL + data["name"]}
        if (call := data.get("function_call")) is None:
            return data
        if data.get("role") != "assistant" or data.get("tool_calls"):
            raise ValueError("function_call: only an assistant message calls a function, with function_call or "
                             "tool_calls, not both")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError("function_call: an object with the function's name and its arguments")
        rest = {k: v for k, v in data.items() if k != "function_call"}
        return {**rest, "tool_calls": [{"id": LEGACY_CALL + call["name"], "type": "function", "function": call}]}

    @model_validator(mode="after")
    def _tool_turn_answers_a_call(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message must name the call it answers")
        return self

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        """OpenAI's list-of-parts content: only text parts are understood."""
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                texts.append(part["text"])
            return "".join(texts)
        return v


class StreamOptions(StrictBody):
    include_usage: bool = False


class JsonSchema(StrictBody):
    name: str = Field("response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class Function(StrictBody):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema for the arguments (an object)
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v):
        if v is not None and v.get("type", "object") != "object":
            raise ValueError("must be a JSON schema of type 'object'")
        return v


class Tool(StrictBody):
    type: Literal["function"]
    function: Function


class NamedFunction(StrictBody):
    name: str


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(StrictBody):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(..., min_length=1, max_length=128)


class AllowedToolChoice(StrictBody):
    """OpenAI's `allowed_tools`: the model may call only these of the tools, `mode` as tool_choice's auto or
    required. Served as that tool choice with those tools alone offered (ChatRequest._tools_named_once)."""
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools

    def names(self) -> list[str]:
        return [t.function.name for t in self.allowed_tools.tools]


class Thinking(StrictBody):
    type: Literal["enabled", "disabled"] = "enabled"


NULL_MEANS_DEFAULT = {"n", "presence_penalty", "frequency_penalty", "stream", "skip_special_tokens",
                      "parallel_tool_calls", "echo", "store"}


def null_is_the_default(data):
    """null for the fields of NULL_MEANS_DEFAULT means their default, as OpenAI's API takes it (the openai SDK
    sends `n=None` as null)."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if v is not None or k not in NULL_MEANS_DEFAULT}
    return data


class Sampling(StrictBody):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: the model's generation_config.json, else 1
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # OpenAI's int64 (clients send -1 for "any")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logprobs: bool | None = None  # chat's; the legacy completions take an integer (CompletionRequest)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)  # token id (as text) -> bias in [-100, 100]
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True  # control tokens the model writes are left out of the text (vLLM's field)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        return null_is_the_default(data)

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v):
        """Keys are token ids; the ids and the biases' range are the engine's check (SamplingParams.check)."""
        for token in v or {}:
            if not (token.isascii() and token.isdigit() and len(token) <= 10):  # "²".isdigit(), but int() refuses it
                raise ValueError(f"keys must be token ids, got {token[:20]!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of up to 16 non-empty strings")
        return stops


def check_tools(names: list[str], choice, named: str | None) -> None:
    """The tools' names are unique and the tool choice (`named`: the function it names) can be followed."""
    if len(set(names)) != len(names):
        raise ValueError("tools: function names must be unique")
    if named is not None and named not in names:
        raise ValueError(f"tool_choice: no tool named {named!r} in tools")
    if choice == "required" and not names:
        raise ValueError("tool_choice: 'required' needs tools")


def template_variables(value: dict | None) -> dict | None:
    """vLLM's chat_template_kwargs: variables the chat template reads (`enable_thinking`, `thinking`: booleans, which
    turn thinking on or off as `thinking` does), never those rendering itself passes (the messages, the tools, the
    generation prompt, the special tokens)."""
    for key, v in (value or {}).items():
        if key in TEMPLATE_NAMES or key.endswith("_token") or not key.isidentifier():
            raise ValueError(f"{key!r} is not a variable a request may set")
        if key in THINKING_NAMES and not isinstance(v, bool):
            raise ValueError(f"{key}: true or false, not {v!r}")
    return value


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    thinking: Thinking | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | AllowedToolChoice | None = None
    parallel_tool_calls: bool = True
    # OpenAI's deprecated form of tools and tool_choice: served as them, the call answered as `function_call`
    functions: list[Function] | None = Field(None, max_length=128)
    function_call: Literal["auto", "none"] | NamedFunction | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more variables for the chat template

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value):
        return template_variables(value)

    @property
    def legacy(self) -> bool:
        """The request offers its tools in the deprecated form, and its reply's call comes back as `function_call`."""
        return self.functions is not None or self.function_call is not None

    @model_validator(mode="after")
    def _tools_named_once(self):
        if self.legacy:  # one call a reply, as the deprecated form answers
            if self.tools is not None or self.tool_choice is not None:
                raise ValueError("functions: send tools and tool_choice, or the deprecated functions and "
                                 "function_call, not both")
            self.tools = [Tool(type="function", function=f) for f in self.functions or []]
            call = self.function_call
            self.tool_choice = NamedToolChoice(type="function", function=call) if isinstance(call, NamedFunction) else call
            self.parallel_tool_calls = False
        if isinstance(self.tool_choice, AllowedToolChoice):
            allowed, names = self.tool_choice.names(), [t.function.name for t in self.tools or []]
            if unknown := [n for n in allowed if n not in names]:
                raise ValueError(f"tool_choice.allowed_tools.tools: no tool named {unknown[0]!r} in tools")
            self.tools = [t for t in self.tools if t.function.name in allowed]
            self.tool_choice = self.tool_choice.allowed_tools.mode
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        check_tools([t.function.name for t in self.tools or []], self.tool_choice, named)
        called = set()
        for i, m in enumerate(self.messages):
            called |= {c.id for c in m.tool_calls or []}
            if m.role == "tool" and m.tool_call_id not in called:
                if m.tool_call_id.startswith(LEGACY_CALL):  # a "function" message (see Message._legacy_function_turns)
                    raise ValueError(f"messages.{i}.name: no earlier assistant message called the function "
                                     f"{m.tool_call_id.removeprefix(LEGACY_CALL)!r} (function_call)")
                raise ValueError(f"messages.{i}.tool_call_id: {m.tool_call_id!r} answers no call an earlier assistant "
                                 "message made")
        return self


class TokenizeRequest(StrictBody):
    """vLLM's /tokenize: a chat request's messages (with its tools and thinking, rendered as the chat route renders
    them, the generation prompt included) or a completion's text prompt -> their tokens."""
    model: str | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=128)
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    prompt: str | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value):
        return template_variables(value)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("messages: give messages (a chat) or prompt (a text), one of them")
        return self


class CompletionRequest(Sampling):
    prompt: str | list  # a string, a list of strings, a list of token ids, or a list of token-id lists
    suffix: str | None = None
    echo: bool = False
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 scores an echoed prompt
    logprobs: int | None = Field(None, ge=0, le=20)  # the legacy form: alternatives per token (OpenAI allows 5)
    best_of: int | None = Field(None, ge=1, le=16)  # completions drawn per prompt, of which the n best are returned

    @model_validator(mode="after")
    def _legacy_fields(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of: the best of several completions cannot be streamed (they are compared once "
                             "written)")
        if self.top_logprobs is not None:
            raise ValueError("top_logprobs: is chat's; /v1/completions takes logprobs: N for the N most likely "
                             "tokens at each position")
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        def ids(p) -> bool:
            return isinstance(p, list) and bool(p) and all(type(t) is int and t >= 0 for t in p)

        if isinstance(v, str) or ids(v) or isinstance(v, list) and v and (all(isinstance(p, str) for p in v)
                                                                           or all(ids(p) for p in v)):
            return v
        raise ValueError("must be a string, a list of strings, a list of token ids (integers >= 0) or a list of "
                         "such lists, none of them empty")

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else p


# ---- OpenAI's Responses API (POST /v1/responses), served by translating a request into a ChatRequest ----
ITEM_FIELDS = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
               "function_call_output": ("call_id", "output"), "reasoning": ()}  # each item type's required fields
TEXT_PARTS = ("input_text", "output_text")
# `include` asks for extra output; the reasoning's encrypted form is the one a client without built-in tools sends
# (Codex, the Agents SDK with store off): reasoning items carry it in plain here, and earlier turns' reasoning is
# dropped anyway
INCLUDABLE = {"reasoning.encrypted_content"}


def check_include(values: list[str]) -> None:
    """`include` (of a request, or of a stored response's retrieval) asks only for what can be included here."""
    for value in values:
        if value not in INCLUDABLE:
            raise ValueError(f"include: {value!r} cannot be included here (only {', '.join(sorted(INCLUDABLE))} is)")


def part_texts(parts: list[dict], kinds: tuple[str, ...] = TEXT_PARTS, sep: str = "") -> str:
    """A list of content parts (as JSON gives them) as its text, joined by `sep`: only the text parts `kinds` are
    understood (no images or files)."""
    texts = []
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise ValueError(f"only text parts ({', '.join(kinds)}) are supported, not {kind or part!r} (part {k})")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"the text of part {k} ({kind}) must be a string")
        texts.append(part["text"])
    return sep.join(texts)


class InputItem(StrictBody):
    """One item of a Responses request's input: a message (its `type` may be left out), a call the model made, a
    call's output, or a reasoning item (dropped: DeepSeek's templates leave earlier turns' reasoning out too)."""
    type: str = "message"
    id: str | None = None  # (a kept response's input items are listed by id: one is given to each that has none)
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list | None = None

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        if self.type not in ITEM_FIELDS:
            raise ValueError(f"type: {self.type!r} items are not supported; the input holds messages, function_call, "
                             "function_call_output and reasoning items")
        if self.type == "reasoning":  # its content (reasoning_text parts) is not read
            self.content = None
            return self
        for field in ITEM_FIELDS[self.type]:
            if getattr(self, field) is None:
                raise ValueError(f"{field}: is required in a {self.type} item")
        for field in ("content", "output"):
            if isinstance(value := getattr(self, field), list):
                try:
                    setattr(self, field, part_texts(value))
                except ValueError as e:
                    raise ValueError(f"{field}: {e}") from None
        return self


class ResponseTool(Function):
    """A function tool in the Responses API's flat form: {"type": "function", "name", "parameters", ...}."""
    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, data):
        if isinstance(data, dict) and data.get("type") != "function":  # checked first: a built-in tool has no name
            raise ValueError(f"type: only function tools are supported, not {data.get('type')!r} (OpenAI's built-in "
                             "tools run on OpenAI's servers)")
        return data


class ResponseToolChoice(StrictBody):
    type: Literal["function"]
    name: str


class ResponseAllowedTools(StrictBody):
    """`allowed_tools` as the Responses API writes it (chat's AllowedToolChoice, its fields one level up)."""
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[ResponseToolChoice] = Field(..., min_length=1, max_length=128)


class TextFormat(JsonSchema):
    """`text.format`: chat's response_format with the json_schema's fields beside `type` rather than under it."""
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")  # (a format other than json_schema has none)

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("schema: is required when type is 'json_schema'")
        return self


class TextConfig(StrictBody):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # echoed; a model this size has no say in it


class ReasoningConfig(StrictBody):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # none is written: the reasoning comes whole


class ResponsesRequest(StrictBody):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ResponseTool] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | ResponseToolChoice | ResponseAllowedTools | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # chat's, beyond OpenAI's Responses API
    stream: bool = False
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    store: bool = True
    previous_response_id: str | None = None
    # refused unless left at what this server does (see _served)
    include: list[str] | None = None
    background: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    conversation: Any = None
    prompt: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        return null_is_the_default(data)

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, v):
        if not isinstance(v, (str, list)) or isinstance(v, list) and not 0 < len(v) <= MAX_MESSAGES:
            raise ValueError(f"must be a string or a list of 1 to {MAX_MESSAGES} items")
        return v

    @model_validator(mode="after")
    def _served(self):
        for value, refusal in (
                (self.background, "background: background responses are not supported; stream: true gives the reply "
                                  "as it is written"),
                (self.truncation == "auto", "truncation: 'auto' is not supported: an input over the context is "
                                            "refused, never cut"),
                (self.conversation, "conversation: conversation objects are not supported; continue a conversation "
                                    "with previous_response_id"),
                (self.prompt, "prompt: stored prompt templates are not supported; send instructions and input")):
            if value:
                raise ValueError(refusal)
        check_include(self.include or [])
        names = [t.name for t in self.tools or []]
        if isinstance(self.tool_choice, ResponseAllowedTools) and (
                unknown := [t.name for t in self.tool_choice.tools if t.name not in names]):
            raise ValueError(f"tool_choice.tools: no tool named {unknown[0]!r} in tools")
        named = self.tool_choice.name if isinstance(self.tool_choice, ResponseToolChoice) else None
        check_tools(names, self.tool_choice, named)
        return self

    @property
    def items(self) -> list[InputItem]:
        return [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def chat_request(self, earlier: list[InputItem]) -> ChatRequest:
        """The chat completion this asks for, after the conversation `earlier` (that of previous_response_id):
        instructions as the first system message; reasoning effort "none" turns thinking off, any other turns it on,
        and without one the model's default holds, as in chat."""
        effort = self.reasoning.effort if self.reasoning else None
        fmt = self.text.format if self.text else None
        choice = self.tool_choice
        return ChatRequest(
            model=self.model, messages=self.chat_messages(earlier), max_tokens=self.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p, seed=self.seed, parallel_tool_calls=self.parallel_tool_calls,
            thinking=None if effort is None else Thinking(type="disabled" if effort == "none" else "enabled"),
            tools=[Tool(type="function", function=Function(**t.model_dump(exclude={"type"}, by_alias=True)))
                   for t in self.tools] if self.tools else None,
            tool_choice=NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
            if isinstance(choice, ResponseToolChoice) else AllowedToolChoice(type="allowed_tools", allowed_tools=AllowedTools(
                mode=choice.mode, tools=[NamedToolChoice(type="function", function=NamedFunction(name=t.name))
                                         for t in choice.tools])) if isinstance(choice, ResponseAllowedTools) else choice,
            response_format=None if fmt is None else ResponseFormat(
                type=fmt.type, json_schema=JsonSchema(**fmt.model_dump(exclude={"type"}, by_alias=True,
                                                                       exclude_none=True))
                if fmt.type == "json_schema" else None))

    def chat_messages(self, earlier: list[InputItem]) -> list[dict]:
        """The conversation as chat messages: a model's calls join the assistant message before them, each output
        must answer a call made before it, and the input ends with something for the model to answer."""
        msgs = [] if self.instructions is None else [{"role": "system", "content": self.instructions}]
        items, called = [*earlier, *self.items], set()
        for i, item in enumerate(items):
            here = f"input.{i - len(earlier)}"
            if item.type == "message":
                msgs.append({"role": item.role, "content": item.content})
            elif item.type == "function_call":
                called.add(item.call_id)
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if msgs and msgs[-1]["role"] == "assistant":
                    msgs[-1]["tool_calls"] = [*msgs[-1].get("tool_calls", []), call]
                else:
                    msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif item.type == "function_call_output":
                if item.call_id not in called:
                    raise APIError(400, f"{here}.call_id: {item.call_id!r} answers no function_call before it",
                                   param=f"{here}.call_id")
                msgs.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        if not msgs:
            raise APIError(400, "input: there is no message in it (reasoning items are left out)", param="input")
        if len(msgs) > MAX_MESSAGES:
            raise APIError(400, f"input: the conversation holds {len(msgs)} messages, over {MAX_MESSAGES}",
                           param="input")
        if msgs[-1].get("tool_calls"):  # (a last assistant message is a finished turn, the reply a new one)
            raise APIError(400, "input: the last item is a function_call; end with its function_call_output",
                           param="input")
        return msgs

    def echoed(self) -> dict:
        """The request's settings as a Response repeats them (OpenAI's defaults where left out)."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "metadata": self.metadata or {}, "parallel_tool_calls": self.parallel_tool_calls,
                "previous_response_id": self.previous_response_id,
                "reasoning": (self.reasoning or ReasoningConfig()).model_dump(), "store": self.store,
                "text": {"format": {"type": "text"}, **(self.text.model_dump(by_alias=True, exclude_none=True)
                                                       if self.text else {})},
                "tool_choice": self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel)
                else self.tool_choice or "auto",
                "tools": [t.model_dump() for t in self.tools or []], "truncation": "disabled", "user": self.user}


# ---- responses ----
def new_id(prefix: str) -> str:
    """A fresh id after `prefix`, which ends with its separator as OpenAI's do (`chatcmpl-`, `resp_`)."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
SOURCES = {"body", "query", "path"}  # where FastAPI read a parameter from: an error's location starts with it


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's error list -> one readable sentence and the offending parameter: of the first field's errors
    (one per union member tried), the one that reached deepest (a named tool_choice missing its function, rather
    than "should be 'auto', 'none' or 'required'")."""
    def where(x) -> tuple:  # the location in the body, or the query parameter's name
        loc = tuple(x.get("loc", ()))
        return loc[1:] if loc[:1] and loc[0] in SOURCES else loc

    e = max((x for x in errors if where(x)[:1] == where(errors[0])[:1]), key=lambda x: len(x.get("loc", ())))
    # not the union members pydantic tried ("tool_choice.literal['auto','none','required']", "content.str")
    loc = [str(p) for p in where(e) if (isinstance(p, int) or re.fullmatch(r"[a-z_][a-z0-9_]*", p))
           and p not in UNION_TAGS]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    kind = e.get("type", "")
    if kind == "missing":
        msg = "is required"
    elif kind == "json_invalid":
        return "the request body is not valid JSON", None
    elif kind in ("model_attributes_type", "dict_type"):  # an object expected: the body's or a field's
        if not loc:
            return "the request body must be a JSON object", None
        msg = "should be a JSON object"
    named = re.match(r"([a-z_][a-z0-9_]*(?:\.(?:[a-z_][a-z0-9_]*|\d+))*): ", msg)
    if named and param is None:  # a check across fields (a model validator) names its parameter at the start
        return msg, named.group(1)
    if named and "." not in named.group(1):  # a nested object's check names one of its fields
        param = f"{param}.{named.group(1)}"
        return f"{param}: {msg[named.end():]}", param
    return (f"{param}: {msg}" if param else msg), param
