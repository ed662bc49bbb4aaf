"""The OpenAI- and DeepSeek-compatible API (FastAPI), over the one engine running in a background thread.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (with
`suffix` = fill-in-the-middle), POST /v1/responses (OpenAI's Responses API, served as a chat completion; GET and
DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items for the responses kept in memory), Anthropic's
Messages API at /anthropic/v1/messages (anthropic.py, also served as a chat completion, its errors in Anthropic's
shape), the chat web app at / with its conversation store and built-in tools at /api/ (chats.py).
The reasoning a model writes between <think> and </think> is returned as `reasoning_content`
(`delta.reasoning_content` when streaming), never inside `content`. Model names: the served
name, plus DeepSeek's `deepseek-reasoner` (thinking on) and `deepseek-chat` (thinking off), so
DeepSeek API clients work unchanged.
Before any route, `guard.Guard` checks the Host (without a key), the key and the body's size.
Every failure is one OpenAI-shaped error: the response's status and body, or, once a stream has
started, a last `data: {"error": ...}` event (no `[DONE]`): a stream never ends looking complete
when its generation failed.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import cached_property, lru_cache, reduce
from typing import Literal, NamedTuple
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..data.shards import fim_arrange
from ..inference import ContextOverflow, Engine, EngineBusy, InvalidRequest, SamplingParams
from ..inference.constraints import LEADING_SPACE, Grammar, GrammarError, json_rule, vocabulary
from ..reasoning import ReasoningStream, split_reasoning
from ..tokenizer import THINK, THINKING_NAMES, ChatFormatError, DeepSeekTokenizer
from ..tools import (CallFormat, CallStream, calculator_format, call_tokens, call_trigger, describe_tools,
                     hidden_in_chat, renders_tools)
from .chats import NO_EXAMPLES, example_routes, routes, tool_routes
from .guard import LOOPBACK, MAX_BODY, Guard
from .protocol import (APIError, ChatRequest, CompletionRequest, InputItem, NamedToolChoice, ResponsesRequest,
                       TokenizeRequest, check_include, new_id, now, validation_message)

log = logging.getLogger("nanoseek")
WEB = Path(__file__).parent / "web"
DEFAULT_MAX_TOKENS = 4096
# a stream's response waits this many seconds at most for its first event (see _sse)
FIRST_EVENT_WAIT = 10.0


class Service:
    """One served model: its engine, tokenizer, name and the web app's examples for it."""

    def __init__(self, engine: Engine, tok: DeepSeekTokenizer, name: str, examples: dict = NO_EXAMPLES):
        self.engine, self.tok, self.name, self.examples = engine, tok, name, examples

    @cached_property
    def calculator(self) -> bool:
        """Whether the web app may offer this model its built-in calculator."""
        return calculator_format(self.tok, self.engine.max_len) is not None

    @cached_property
    def call_format(self) -> CallFormat | None:
        """How this model's chat template writes tool calls (None: it has no tool calls)."""
        return CallFormat.probe(self.tok)

    @cached_property
    def hidden_in_chat(self) -> frozenset[int]:
        """The control tokens a chat reply's text leaves out (`tools.hidden_in_chat`)."""
        return hidden_in_chat(self.tok, self.call_format)

    @cached_property
    def vocab(self):
        """The vocabulary as llguidance reads it (grammars; each token's bytes)."""
        return vocabulary(self.tok.tok.to_str(), self.engine.config.vocab_size, self.tok.eos_ids)

    @lru_cache(maxsize=64)
    def grammar(self, lark: str | None, trigger: int | None, banned: frozenset, required: bool,
                banned_after: tuple[int, frozenset] | None = None, banned_before_trigger: frozenset = frozenset(),
                opens: tuple[int, int] | None = None) -> Grammar:
        return Grammar.compile(self.vocab, lark, trigger, banned, required, banned_after, banned_before_trigger, opens)

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes: a piece of a character (byte-level BPE splits emoji and CJK) is its byte(s),
        not the replacement character its text decodes to; a control token is its text."""
        return self.vocab.decode_bytes([token]) or self.tok.decode([token]).encode("utf-8")

    def check_fits(self, jobs: int, param: str) -> None:
        """A request of more jobs than the engine's queue holds never fits, even when idle: a 400 naming
        `param`, not a 503 that clients retry."""
        if jobs > self.engine.max_queue:
            raise APIError(400, f"this request asks for {jobs} completions (prompts x n); this server takes at most "
                                f"{self.engine.max_queue} at once", param=param)

    def submit(self, prompt: list[int], params: SamplingParams, n: int, loop: asyncio.AbstractEventLoop,
               prompt_param: str = "messages"):
        """n requests with their asyncio event queues; refused requests become API errors (a prompt
        over the context names `prompt_param`)."""
        self.check_fits(n, "n")
        jobs = []
        try:
            for i in range(n):
                q: asyncio.Queue = asyncio.Queue()
                p = params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**63)
                req = self.engine.submit(prompt, p, on_event=lambda ev, q=q: loop.call_soon_threadsafe(q.put_nowait, ev))
                jobs.append((req, q))
        except (InvalidRequest, EngineBusy) as e:
            for req, _ in jobs:
                self.engine.cancel(req)
            raise _refusal(e, prompt_param) from None
        return jobs


ALIASES = {"deepseek-reasoner": True, "deepseek-chat": False}  # DeepSeek's names -> thinking on/off


class Models:
    """The models a server serves, by the names clients use: each model's own name, and DeepSeek's
    names (ALIASES) for the first, so DeepSeek API clients work unchanged."""

    def __init__(self, services: Sequence[Service]):
        self.all = list(services)
        self.by_name = {s.name: s for s in self.all}
        if len(self.by_name) < len(self.all) or set(self.by_name) & set(ALIASES):
            raise ValueError(f"served models need distinct names other than {sorted(ALIASES)}: "
                             f"{[s.name for s in self.all]}")

    def pick(self, model: str | None) -> tuple[Service, bool]:
        """The model a request names (None: the first) and whether it thinks by default."""
        if model is None or model in self.by_name:
            return self.by_name.get(model, self.all[0]), True
        if model in ALIASES:
            return self.all[0], ALIASES[model]
        served = ", ".join(repr(n) for n in self.by_name)
        first = "the first " if len(self.all) > 1 else ""
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served} ({first}also as "
                            "'deepseek-reasoner' and 'deepseek-chat')", code="model_not_found", param="model")


def _refusal(e: InvalidRequest | EngineBusy, prompt_param: str = "messages") -> APIError:
    """The API error for a request the engine refused; the prompt's parameter is `prompt_param`."""
    if isinstance(e, EngineBusy):
        return APIError(503, f"the server is busy ({e}); retry shortly", "server_busy", code="overloaded")
    if not isinstance(e, ContextOverflow):  # a message that starts with a parameter's name names it
        named = re.match(r"(logit_bias|max_new_tokens|temperature|top_p|top_k|seed|stop|top_logprobs)\b", str(e))
        param = {"max_new_tokens": "max_tokens"}.get(named.group(1), named.group(1)) if named else None
        return APIError(400, str(e), param=param or (prompt_param if "prompt" in str(e) else None))
    n, m, ctx = e.prompt_tokens, e.max_new_tokens, e.context
    if m == 0:  # a prompt scored alone (max_tokens 0, echo) needs no room after it
        return APIError(400, f"the prompt is {n} tokens, over this model's context of {ctx} tokens: shorten it by at "
                             f"least {n - ctx}", param=prompt_param, code="context_length_exceeded")
    if n >= ctx:  # the reply needs at least one token of room
        over = f"over this model's context of {ctx} tokens by {n - ctx}" if n > ctx else \
            f"as long as this model's context of {ctx} tokens"
        return APIError(400, f"the prompt is {n} tokens, {over}: shorten it by at least {n - ctx + 1} to leave room "
                             "for a reply", param=prompt_param, code="context_length_exceeded")
    return APIError(400, f"the prompt ({n} tokens) plus max_tokens ({m}) exceeds this model's context of {ctx} "
                         f"tokens by {n + m - ctx}", param="max_tokens", code="context_length_exceeded")


# where clients find the API: OpenAI's base URL (.../v1), DeepSeek's (https://api.deepseek.com, no /v1) and DeepSeek's
# beta one (.../beta, which its docs give for chat prefix completion and FIM): a client pointed at this server with any
# of them works
API_BASES = ("/v1", "", "/beta")


def create_app(engine: Engine, tok: DeepSeekTokenizer, name: str = "nanoseek", api_key: str | None = None,
               store=None, examples: dict = NO_EXAMPLES, allowed_hosts: Sequence[str] = LOOPBACK,
               max_body: int = MAX_BODY, also: Sequence[Service] = (), allowed_origins: Sequence[str] = ()) -> FastAPI:
    """The app serving `name` (engine, tok) and the models in `also`, each under its own name;
    without `api_key` it answers only requests whose Host is in `allowed_hosts` (guard.allowed_hosts
    gives them for a bound address); bodies over `max_body` bytes are refused. `examples`
    (chats.read_examples of the model folder) fill the web app's welcome screen. Web pages served from
    `allowed_origins` ("*": any) may call it from a browser (CORS; none by default)."""
    from .anthropic import AnthropicErrors, routes as anthropic_routes  # (a module built on this one)

    models = Models([Service(engine, tok, name, examples), *also])
    engines = [s.engine for s in models.all]
    kept = KeptResponses()  # for the Responses API's previous_response_id
    started = now()  # the models' `created` (they came into being, for this API, when it started)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for e in engines:
            e.start()
        yield
        for e in engines:
            e.shutdown()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, hosts=allowed_hosts, max_body=max_body)
    app.add_middleware(AnthropicErrors)  # outside the Guard: its refusals under /anthropic in Anthropic's shape too
    if allowed_origins:  # outermost: a browser's preflight carries no key, and every answer (refusals too) needs the header
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"], max_age=600)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):  # a busy server says when to try again (the SDKs wait that long)
        return JSONResponse(e.body(), status_code=e.status, headers={"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        msg, param = validation_message(e.errors())
        if msg.startswith("the request body is not valid JSON"):
            msg = _unreadable(await request.body())  # where
        elif param is None:  # the body as a whole
            ctype = request.headers.get("content-type", "")
            if not await request.body():
                msg = "the request body is empty: send a JSON object (Content-Type: application/json)"
            elif "json" not in ctype.lower():  # curl -d sends a form's type unless told
                msg = (f"the request body must be sent as JSON, with the header Content-Type: application/json "
                       f"(it came as {ctype or 'no content type'})")
        return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):  # routing, and a body FastAPI cannot parse
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}",
                   400: _unreadable(await request.body())}.get(e.status_code, str(e.detail))
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(APIError(e.status_code, message, code=code).body(), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):  # an ordinary hang-up, not an error to log
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):  # a bug, never a client mistake: no traceback leaves
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=e)  # (the server's log)
        return JSONResponse(APIError(500, "internal error", "server_error").body(), status_code=500)

    @app.get("/health")
    async def health():  # the counts are summed over the served models
        return {"status": "ok" if all(e.error is None for e in engines) else "degraded", "model": name,
                "models": list(models.by_name),
                "running": sum(len(e.active) for e in engines), "waiting": sum(len(e.waiting) for e in engines),
                "cache_rows_in_use": sum(int((e.cache.lengths[0] > 0).sum()) for e in engines),
                "prefix_cache_mib": round(sum(e.prefixes.tokens * e.cache.bytes_per_token for e in engines) / 2**20, 1)}

    api = APIRouter()  # the key is checked by the Guard, before the body is read

    def card(model: str) -> dict:  # DeepSeek's names are aliases of the first model: `parent` says so
        return {"id": model, "object": "model", "created": started, "owned_by": "nanoseek",
                "max_model_len": models.pick(model)[0].engine.max_len,  # its context, in tokens (vLLM's field)
                **({"parent": name} if model in ALIASES else {})}

    openai = APIRouter()

    @openai.get("/models")
    async def list_models():
        return {"object": "list", "data": [card(m) for m in (*models.by_name, *ALIASES)]}

    @openai.get("/models/{model:path}")
    async def model_card(model: str):
        models.pick(model)  # 404 for a name this server does not serve
        return card(model)

    @openai.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await chat(*models.pick(body.model), body, request)

    @openai.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await complete(models.pick(body.model)[0], body, request)

    @openai.post("/responses")
    async def responses(body: ResponsesRequest, request: Request):
        return await respond(*models.pick(body.model), body, request, kept)

    @openai.post("/responses/input_tokens")
    async def response_input_tokens(body: ResponsesRequest):
        """The prompt a response request would send, counted (rendered by the same function)."""
        svc, thinks = models.pick(body.model)
        try:
            chat_body = body.chat_request(kept.conversation(body.previous_response_id))
            prompt = (await asyncio.to_thread(_chat_job, svc, thinks, chat_body))[0]
        except APIError as e:
            raise in_terms(e, RESPONSES_TERMS) from None
        return {"object": "response.input_tokens", "input_tokens": len(prompt)}

    @openai.post("/responses/{name}")
    async def unserved_response_route(name: str):  # (compact, say: without this, GET /responses/{rid} answered 405)
        raise APIError(404, f"POST /v1/responses/{name} is not served here; served: POST /v1/responses, POST "
                            "/v1/responses/input_tokens, GET and DELETE /v1/responses/{id}, GET "
                            "/v1/responses/{id}/input_items")

    @openai.get("/responses/{rid}")
    async def stored_response(rid: str, request: Request, stream: bool = False):
        _retrieval(request, stream)
        return kept.get(rid).response

    @openai.delete("/responses/{rid}")
    async def delete_response(rid: str):
        kept.forget(rid)
        return {"id": rid, "object": "response", "deleted": True}

    @openai.get("/responses/{rid}/input_items")
    async def input_items(rid: str, request: Request, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc", after: str | None = None):
        _retrieval(request, False)
        items = kept.input_items(rid)
        return _page(items if order == "asc" else items[::-1], after, limit)

    @openai.get("/user/balance")
    async def balance():  # DeepSeek's, which its clients may ask before they start: a local server costs nothing
        return {"is_available": True, "balance_infos": []}

    @openai.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        svc, thinks = models.pick(body.model)
        ids = await asyncio.to_thread(_tokenize, svc, thinks, body)
        return {"count": len(ids), "max_model_len": svc.engine.max_len, "tokens": ids}

    for base in API_BASES:
        api.include_router(openai, prefix=base)
    api.include_router(anthropic_routes(models))  # Anthropic's Messages API at /anthropic, as DeepSeek serves it

    if store is not None:
        api.include_router(routes(store))
    api.include_router(tool_routes(lambda model: models.pick(model)[0].calculator))  # the web app's calculator
    api.include_router(example_routes(lambda model: models.pick(model)[0].examples))
    app.include_router(api)
    if WEB.is_dir():
        app.mount("/static", StaticFiles(directory=WEB), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(WEB / "index.html")

        @app.get("/favicon.ico", include_in_schema=False)
        async def favicon():
            return FileResponse(WEB / "icon.svg", media_type="image/svg+xml")

    return app


# ---- chat completions ----
def _thinking(default: bool, body: ChatRequest) -> bool:
    """Thinking on or off: the request's `thinking`, else its chat_template_kwargs' (vLLM's clients turn Qwen3's off
    with enable_thinking), else the model name's default."""
    if body.thinking is not None:
        return body.thinking.type == "enabled"
    asked = {k: v for k, v in (body.chat_template_kwargs or {}).items() if k in THINKING_NAMES}
    return next(iter(asked.values())) if asked else default


def _template_variables(body: ChatRequest) -> dict:
    """The request's own template variables, less those `_thinking` reads."""
    return {k: v for k, v in (body.chat_template_kwargs or {}).items() if k not in THINKING_NAMES}


def _messages(body: ChatRequest) -> list[dict]:
    """The request's messages as chat-template dicts (tool calls and tool results included)."""
    msgs = []
    for i, m in enumerate(body.messages):
        if m.prefix and (i != len(body.messages) - 1 or m.role != "assistant"):
            raise APIError(400, "only the last message may have prefix: true, and it must be an assistant message",
                           param=f"messages.{i}.prefix")
        if m.role != "assistant" and m.content is None:
            raise APIError(400, f"messages.{i}.content is required for {m.role} messages", param=f"messages.{i}.content")
        msg = {"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls:  # DeepSeek's templates render calls for an assistant turn whose content is None
            msg["content"] = m.content or None
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        msgs.append(msg)
    if not any(m["role"] == "user" for m in msgs):
        raise APIError(400, "messages must contain at least one user message", param="messages")
    # (a last assistant message without prefix is a finished turn, and the reply a new one, as OpenAI and vLLM answer
    # it: LangGraph's structured response asks so after an agent's last reply)
    return msgs


def _tools(svc: Service, body: ChatRequest) -> tuple[list[dict], str | None]:
    """-> (the tools as dicts, the tool choice: 'auto', 'required', a function name, or None for no calls)."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice or ("auto" if tools else "none")
    if isinstance(choice, NamedToolChoice):
        choice = choice.function.name
    if not tools or choice == "none":
        return tools, None
    if svc.call_format is None:
        raise APIError(400, "this model's chat template has no tool-call format, so it cannot call tools", param="tools")
    return tools, choice


def _chat_prompt(svc: Service, body: ChatRequest, thinking: bool, tools: list[dict]) -> tuple[list[int], bool, bool]:
    """-> (prompt ids, whether the reply starts inside its reasoning, prefix mode). The prompt is
    rendered by the model's own chat template; tools are described by the template if it renders
    them, else in a system message."""
    if not svc.tok.chat_template:
        raise APIError(400, f"the model '{svc.name}' has no chat template (a base model): use /v1/completions",
                       param="model")
    msgs = _messages(body)
    if tools and not renders_tools(svc.tok) and svc.call_format is not None:
        note = describe_tools(tools, svc.call_format)
        if msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + note}
        else:
            msgs.insert(0, {"role": "system", "content": note})
    template_tools = tools if tools and renders_tools(svc.tok) else None
    try:
        if (last := body.messages[-1]).prefix:  # the reply starts as given (see render_prefixed)
            ids, started = svc.tok.render_prefixed(msgs[:-1], last.content or "", last.reasoning_content,
                                                   thinking=thinking, tools=template_tools,
                                                   variables=_template_variables(body))
            return ids, started, True
        ids = svc.tok.render_prompt(msgs, thinking=thinking, tools=template_tools, variables=_template_variables(body))
    except ChatFormatError as e:
        raise APIError(400, str(e), param="messages") from None
    return ids, svc.tok.opens_thinking(ids), False


def _grammar(svc: Service, body: ChatRequest, thinking: bool, started: bool, tools: list[dict],
             choice: str | None) -> Grammar | None:
    """What the reply must follow: tool calls (anywhere once it opens them under 'auto', at once under
    'required' or a named function), the response format's JSON (under 'auto' with a response format:
    the answer is either that JSON or a block of calls), neither; with thinking on, the forced part
    comes after the reasoning. Without thinking the think tags are banned, and with it once the
    reasoning has ended (a second `</think>` would land in the answer); where the prompt opens no reasoning
    (after a tool result) the reply may open its own with its first token, or write no tags; where no tool may be called
    (none offered, or tool_choice 'none') so are the tokens of calls and tool outputs (a model taught
    to call a calculator once wrote a raw call into a reply to a request without tools)."""
    tok, fmt = svc.tok, svc.call_format
    tags = tok.think_tags
    banned = set() if thinking else set(tags)
    reasoning_end = tok.end_think_id if thinking and started and tok.end_think_id is not None else None
    after = (reasoning_end, tags) if reasoning_end is not None else None
    # thinking on where the prompt opens no reasoning (after a tool result): the reply may open its own, at once
    opens = (tok.think_id, tok.end_think_id) if thinking and not started and len(tags) == 2 else None
    rf = body.response_format
    json_answer = None
    if rf is not None and rf.type != "text":
        schema = rf.json_schema.schema_ if rf.type == "json_schema" else None
        json_answer = json_rule(schema if schema is not None else {"type": "object"})
    answer, trigger = None, None  # Lark rules whose top rule is `answer`; the token that opens them
    if choice is not None:
        chosen = tools if choice in ("auto", "required") else [t for t in tools if t["function"]["name"] == choice]
        calls = fmt.grammar(chosen, tok, rule="calls", single=fmt.single or not body.parallel_tool_calls)
        answer = "answer: calls\n" + calls
        if choice == "auto" and json_answer is not None:  # the JSON asked for, or calls
            answer = f"answer: calls | json_answer\njson_answer: {json_answer}\n" + calls
        elif choice == "auto":  # free text until the model opens a block of calls
            trigger = call_trigger(tok, fmt)
            if trigger is None:
                raise APIError(400, "this model opens tool calls with plain text, no token of their own; use "
                                    "tool_choice 'required' or a named function", param="tool_choice")
            # (the call format's other tokens are the grammar's: free text writing one left it in the content)
            return svc.grammar("start: answer\n" + answer, trigger, frozenset(banned), False, after,
                               call_tokens(tok, fmt) - {trigger}, opens)
    else:
        banned |= call_tokens(tok, fmt)
    if answer is None and json_answer is not None:
        answer = f"answer: {json_answer}\n"
    if answer is None:
        return svc.grammar(None, None, frozenset(banned), False, after, opens=opens) if banned or after or opens \
            else None
    start = "start: answer\n"
    if reasoning_end is not None:  # free reasoning; the grammar starts where it ends
        trigger = reasoning_end
        start = f"start: <[{trigger}]> {LEADING_SPACE} answer\n"
    # the reply must reach the calls or the JSON: it may not end inside its reasoning (it had ended there with neither,
    # finish_reason "stop")
    return svc.grammar(start + answer, trigger, frozenset(banned), True, after, svc.engine.eos_ids, opens=opens)


def _sampling(svc: Service, body, prompt_len: int, max_tokens: int | None, hidden: frozenset[int]) -> SamplingParams:
    """The request's sampling parameters, the `hidden` tokens left out of the text unless the request keeps
    them (skip_special_tokens: false); whether the prompt and max_tokens fit is the engine's check."""
    if max_tokens is None:
        max_tokens = svc.engine.fitting(prompt_len, DEFAULT_MAX_TOKENS)
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **svc.tok.sampling_defaults}  # generation_config.json
    seed = None if body.seed is None else body.seed % 2**63  # (an int64 as the engine's seeds: -1 is 2^63 - 1)
    return SamplingParams(max_new_tokens=max_tokens, seed=seed, top_k=defaults["top_k"],
                          temperature=defaults["temperature"] if body.temperature is None else body.temperature,
                          top_p=defaults["top_p"] if body.top_p is None else body.top_p,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          stop=tuple(body.stop or ()), logprobs=bool(body.logprobs), top_logprobs=top,
                          logit_bias=tuple((int(t), b) for t, b in (body.logit_bias or {}).items()),
                          stop_token_ids=tuple(sorted(svc.tok.eos_ids)),
                          skip_token_ids=hidden if body.skip_special_tokens else frozenset())


class _AnswerLogprobs:
    """The logprob entries of the answer alone, as OpenAI's `logprobs.content` covers the message's
    content: those of the reasoning and the `</think>` that ends it, of the whitespace before the
    answer and of stop tokens are left out. Fed a reply's entries in order, whole or as they stream. The
    first entry's `text` leaves out the whitespace before the answer that it carries (` The`), as the content
    does, so the entries' texts join to the content (tokenizers keep trailing whitespace apart)."""

    def __init__(self, svc: Service, started: bool, hidden: frozenset[int] = frozenset()):
        self.tok, self.stops = svc.tok, svc.tok.eos_ids | hidden  # tokens left out of the text, too
        self.reasoning = started and svc.tok.end_think_id is not None  # the reply opens inside its reasoning
        self.leading = True
        self.covered = 0  # characters of the content that the entries handed out by `upto` hold
        # the block of tool calls is no content (OpenAI gives calls no logprobs): the entries end where it opens
        self.opener, self.calling = call_trigger(svc.tok, svc.call_format), False

    def feed(self, entries: list[dict]) -> list[dict]:
        out = []
        for e in entries:
            self.calling = self.calling or (not self.reasoning and e["token"] == self.opener)
            if self.calling:
                continue
            if self.reasoning:
                self.reasoning = e["token"] != self.tok.end_think_id
            elif e["token"] not in self.stops and not self.leading:
                out.append(e)
            elif e["token"] not in self.stops and (text := self.tok.decode([e["token"]])).strip():
                self.leading = False
                out.append({**e, "text": text.lstrip()})
        return out

    def whole(self, entries: list[dict], content: str | None = None) -> list[dict]:
        return self.upto(self.trim(self.feed(entries)), None if content is None else len(content))[0]

    def upto(self, out: list[dict], end: int | None) -> tuple[list[dict], list[dict]]:
        """(the entries whose text starts before character `end` of the content, the rest), counting on from the
        entries handed out before: a stop string cuts the content inside the reply, and the tokens past the cut, or
        past the text a stream has sent so far, are not the content's (yet). end None: all of them."""
        if end is None:
            return out, []
        for n, e in enumerate(out):
            if self.covered >= end:
                return out[:n], out[n:]
            self.covered += len(e.get("text") or self.tok.decode([e["token"]]))
        return out, []

    def trim(self, out: list[dict]) -> list[dict]:
        """The entries without the content's trailing whitespace (at the end of a reply: streamed, the
        entries not sent yet, which hold it back as the text does)."""
        while out and not self.tok.decode([out[-1]["token"]]).strip():
            out.pop()
        return out


def _logprobs_json(svc: Service, lps: list[dict]) -> dict:
    def entry(token: int, logprob: float, text: str | None = None) -> dict:
        full, raw = svc.tok.decode([token]), svc.token_bytes(token)
        if text is not None and text != full:  # whitespace trimmed off the token's ends: off its bytes too
            start = full.find(text)
            head, tail = full[:start].encode(), full[start + len(text):].encode()
            raw = raw[len(head):len(raw) - len(tail)] if raw.startswith(head) and raw.endswith(tail) else text.encode()
        return {"token": full if text is None else text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(lp["token"], lp["logprob"], lp.get("text")),
                         "top_logprobs": [entry(t, v) for t, v in lp["top"]]} for lp in lps]}


def _usage(svc: Service, prompt: list[int], jobs, thinking: bool | None = None) -> dict:
    """OpenAI's usage object (with DeepSeek's cache fields) over all choices; chat replies (thinking
    not None) also count their reasoning tokens."""
    n, done, hit = len(prompt), sum(len(r.tokens) for r, _ in jobs), jobs[0][0].cached_tokens
    u = {"prompt_tokens": n, "completion_tokens": done, "total_tokens": n + done,
         "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": n - hit,
         "prompt_tokens_details": {"cached_tokens": hit}}
    if thinking is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": sum(_reasoning_tokens(svc, r.tokens, thinking)
                                                                  for r, _ in jobs)}
    return u


def _reasoning_tokens(svc: Service, tokens: list[int], thinking: bool) -> int:
    if not thinking:
        return 0
    end = svc.tok.end_think_id
    if end is not None and end in tokens:
        return tokens.index(end)
    return sum(t not in svc.tok.eos_ids for t in tokens)  # reasoning cut short: the end-of-sentence is not reasoning


def _reply(svc: Service, req, thinking: bool, tools: bool, continued: bool = False,
           reasoner: bool = False, legacy: bool = False) -> tuple[dict, str]:
    """A finished choice -> (its message, its finish_reason). continued: the reply goes on from the client's prefix;
    reasoner: the request asked for thinking (deepseek-reasoner), so the message has reasoning_content even where the
    reply did not start inside its reasoning (after a tool result), as DeepSeek's always has; legacy: the request
    offered the deprecated functions, so its one call is answered as `function_call`."""
    # (a reply may open <think> itself)
    reasoning, content = split_reasoning(req.text, started=thinking, continued=continued, cut=req.stop_string is not None)
    msg, finish = {"role": "assistant", "content": content}, _finish(req.finish_reason)
    if thinking or reasoning or reasoner:
        msg["reasoning_content"] = reasoning
    if tools:  # the calls apart; a block cut short (no whole call in it) is left out of the content too
        content, calls, _ = svc.call_format.split(content)
        msg["content"] = content
        if calls and legacy:
            msg.update(content=content or None, function_call=calls[0]["function"])
            finish = "function_call" if finish == "stop" else finish
        elif calls:
            msg.update(content=content or None, tool_calls=calls)
            finish = "tool_calls" if finish == "stop" else finish
    return msg, finish


def _tokenize(svc: Service, thinks: bool, body: TokenizeRequest) -> list[int]:
    """The prompt a chat request of these messages (tools, thinking) or a completion of this text would send."""
    if body.prompt is not None:
        return _completion_prompt(svc, CompletionRequest(prompt=body.prompt), body.prompt).ids
    chat = ChatRequest(model=body.model, messages=body.messages, tools=body.tools, thinking=body.thinking,
                       chat_template_kwargs=body.chat_template_kwargs)
    thinking = _thinking(thinks, chat)
    return _chat_prompt(svc, chat, thinking, _tools(svc, chat)[0])[0]


def _chat_job(svc: Service, thinks: bool, body: ChatRequest) -> tuple[list[int], SamplingParams, bool, bool, bool]:
    """The request as the engine's job: (prompt ids, sampling parameters, whether the reply starts
    inside its reasoning, whether it may call tools, whether it goes on from text the client wrote: a
    prefix). Run off the event loop: rendering and tokenizing a long prompt takes seconds."""
    thinking = _thinking(thinks, body)
    tools, choice = _tools(svc, body)
    _certainly_fits(svc, [part for m in body.messages for part in (m.content, m.reasoning_content) if part], "messages")
    prompt, started, prefixed = _chat_prompt(svc, body, thinking, tools)
    params = _sampling(svc, body, len(prompt), body.max_completion_tokens or body.max_tokens, svc.hidden_in_chat)
    # the text the reply goes on from: the prefix's reasoning (reasoning_content, else content) where the reply starts
    # inside it, else its content
    last = body.messages[-1]
    begun = (last.content if last.reasoning_content is None else last.reasoning_content) if started else last.content
    continued = prefixed and bool((begun or "").replace(THINK, "").strip())
    # a prefix that began the answer (outside any reasoning): the reply goes on with it, no think tags in it
    # (after a tool result, where the template opens no reasoning, a model closed one and the tag landed in content)
    answering = continued and not started
    try:
        grammar = _grammar(svc, body, thinking and not answering, started, tools, choice)
    except GrammarError as e:  # a schema (of a tool's parameters or the response format) llguidance refuses
        param = "tools" if choice is not None else "response_format"
        raise APIError(400, f"{param}: the JSON schema cannot be used: {e}", param=param) from None
    params = replace(params, grammar=grammar, stop_after=svc.tok.end_think_id if started else None)
    return prompt, params, started, choice is not None, continued


async def chat(svc: Service, thinks: bool, body: ChatRequest, request: Request):
    """A chat completion by `svc`'s model, thinking by default when `thinks`."""
    prompt, params, started, with_calls, continued = await asyncio.to_thread(_chat_job, svc, thinks, body)
    jobs = svc.submit(prompt, params, body.n, asyncio.get_running_loop())
    cid, created, model = new_id("chatcmpl-"), now(), body.model or svc.name
    reasoner = _thinking(thinks, body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _sse(_chat_stream(svc, jobs, request, cid, created, model, started, prompt, include_usage, with_calls,
                                       continued, reasoner, body.legacy), request)
    await _wait_all(svc, jobs, request)
    choices = []
    for i, (req, _) in enumerate(jobs):
        msg, finish = _reply(svc, req, started, with_calls, continued, reasoner, body.legacy)
        choices.append({"index": i, "message": msg, "finish_reason": finish,
                        "logprobs": _logprobs_json(svc, _AnswerLogprobs(svc, started, req.params.skip_token_ids).whole(
                            req.logprobs, (msg.get("content") or "") if req.params.stop else None))
                        if body.logprobs else None})
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": _usage(svc, prompt, jobs, started), "system_fingerprint": "nanoseek"}


async def _chat_stream(svc: Service, jobs, request: Request, cid: str, created: int, model: str, thinking: bool,
                       prompt: list[int], include_usage: bool, with_calls: bool,
                       continued: bool = False, reasoner: bool = False, legacy: bool = False) -> AsyncIterator[dict]:
    """Chunks as OpenAI streams them: reasoning and content deltas, tool-call deltas, each event's
    logprobs in the chunk that carries its text, then the finish reason. continued: the replies go on from the
    client's prefix; reasoner: the request asked for thinking, and every delta carries reasoning_content and content,
    null where it has none, as DeepSeek's deepseek-reasoner streams them (its own example reads
    `delta.reasoning_content` on every chunk); legacy: the deprecated functions were offered, and the one call streams
    as `function_call` deltas."""
    def chunk(i: int, delta: dict, finish: str | None = None, logprobs=None, **extra) -> dict:
        delta = {"content": None, "reasoning_content": None, **delta} if reasoner else delta
        choices = [] if i < 0 else [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "nanoseek", "choices": choices,
                **({"usage": None} if include_usage else {}), **extra}  # (OpenAI: null until the last chunk's)

    events = aiter(_merged_events(svc, jobs, request))
    # the first event before any chunk: a request that fails at once (a schema no reply can follow) is answered
    # with its HTTP error (see _sse), not a stream that opens and then reports it
    first = await anext(events)
    for i in range(len(jobs)):
        yield chunk(i, {"role": "assistant", "content": "", **({"reasoning_content": ""} if reasoner else {})})
    splitters = [ReasoningStream(started=thinking, continued=continued) for _ in jobs]
    calls = [CallStream(svc.call_format) if with_calls else None for _ in jobs]
    answers, pending = [""] * len(jobs), [[] for _ in jobs]  # answer text so far; logprobs not yet sent
    sent = [0] * len(jobs)  # characters of content sent (where a stop string may cut the reply: logprobs follow them)
    answer_logprobs = [_AnswerLogprobs(svc, thinking, req.params.skip_token_ids) for req, _ in jobs]
    async for i, ev in _prepend(first, events):
        final = ev.finish_reason is not None
        if jobs[i][0].params.logprobs:
            pending[i] += answer_logprobs[i].feed(ev.logprobs)
        deltas = []
        for kind, text in splitters[i].feed(ev.text, final=final, cut=final and jobs[i][0].stop_string is not None):
            if kind == "reasoning" or calls[i] is None:
                deltas.append({"reasoning_content" if kind == "reasoning" else "content": text})
                continue
            answers[i] += text
        if calls[i] is not None:
            content, tool_deltas = calls[i].feed(answers[i], final=final)
            deltas += [{"content": content}] if content else []
            if legacy:  # the one call a legacy reply makes (see ChatRequest.legacy): its name, then its arguments
                deltas += [{"function_call": d["function"]} for d in tool_deltas]
            else:
                deltas += [{"tool_calls": tool_deltas}] if tool_deltas else []
        for k, delta in enumerate(deltas):
            sent[i] += len(delta.get("content") or "")
            lp = None
            if k == len(deltas) - 1 and pending[i]:  # those of the content sent so far
                out, pending[i] = answer_logprobs[i].upto(pending[i], sent[i] if jobs[i][0].params.stop else None)
                lp = _logprobs_json(svc, out) if out else None
            yield chunk(i, delta, logprobs=lp)
        if final:
            finish = _finish(ev.finish_reason)
            if calls[i] is not None and calls[i].calls and finish == "stop":
                finish = "function_call" if legacy else "tool_calls"
            rest = answer_logprobs[i].upto(answer_logprobs[i].trim(pending[i]), sent[i] if jobs[i][0].params.stop else None)[0]
            yield chunk(i, {}, finish, logprobs=_logprobs_json(svc, rest) if rest else None)
    if include_usage:
        yield chunk(-1, {}, usage=_usage(svc, prompt, jobs, thinking))


# ---- OpenAI's Responses API: a chat completion in another shape ----
class _Kept(NamedTuple):
    response: dict  # the Response object, as it was answered
    conversation: list[InputItem]  # the input items it answered (after the conversation it followed), its output
    inputs: int  # how many of the conversation's items were its input
    size: int  # characters, counted against KeptResponses.max_chars


# the ids given, in OpenAI's style, to kept input items sent without one
ITEM_IDS = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


class KeptResponses:
    """Recent responses, each with its conversation (the input items it answered, after those of the response it
    followed, then its output), so that a request naming one as previous_response_id goes on from it, and so that it
    can be retrieved, its input items listed, or deleted. In memory until the server stops: the latest `limit`, at
    most `max_chars` in all (each counting its whole conversation, and itself as JSON), the least recently used
    forgotten first. A conversation only grows while it fits the model's context: a request over it is refused,
    and only responses are kept."""

    def __init__(self, limit: int = 1000, max_chars: int = 64 * 2**20):
        self.limit, self.max_chars, self.chars = limit, max_chars, 0
        self.kept: OrderedDict[str, _Kept] = OrderedDict()

    def missing(self, rid: str) -> str:
        return (f"no response {rid!r} is kept here (this server keeps its latest {self.limit} in memory until it "
                f"restarts, none asked with store: false, none deleted)")

    def get(self, rid: str) -> _Kept:
        """The response kept as `rid`, now the most recently used; a 404 if there is none."""
        if rid not in self.kept:
            raise APIError(404, self.missing(rid), code="not_found")
        self.kept.move_to_end(rid)
        return self.kept[rid]

    def conversation(self, rid: str | None) -> list[InputItem]:
        """What a request naming `rid` as its previous_response_id goes on from (a 400 if nothing: its field)."""
        if rid is None:
            return []
        if rid not in self.kept:
            raise APIError(400, f"previous_response_id: {self.missing(rid)}", param="previous_response_id",
                           code="previous_response_not_found")
        return self.get(rid).conversation

    def keep(self, response: dict, conversation: list[InputItem]) -> None:
        """A response with the conversation it answered, which its output joins less its reasoning (a follow-up
        drops it). Each input item without an id gets one, for input_items to list it by."""
        inputs = [i if i.id else i.model_copy(update={"id": new_id(ITEM_IDS[i.type])}) for i in conversation]
        items = inputs + [InputItem.model_validate(o) for o in response["output"] if o["type"] != "reasoning"]
        size = len(json.dumps(response, ensure_ascii=False)) + sum(
            64 + sum(len(getattr(i, f) or "") for f in ("content", "arguments", "output")) for i in items)
        self.kept[response["id"]] = _Kept(response, items, len(inputs), size)
        self.chars += size
        while len(self.kept) > 1 and (len(self.kept) > self.limit or self.chars > self.max_chars):
            self.chars -= self.kept.popitem(last=False)[1].size

    def forget(self, rid: str) -> None:
        self.chars -= self.get(rid).size  # (a 404 if it is not kept)
        del self.kept[rid]

    def input_items(self, rid: str) -> list[dict]:
        """The input items of the response kept as `rid`, oldest first, as the Responses API lists them."""
        kept = self.get(rid)
        return [_listed(i) for i in kept.conversation[:kept.inputs]]


def _listed(item: InputItem) -> dict:
    """An input item as input_items lists it (the openai SDK's ResponseItem): a message's text as one part, a
    reasoning item without its text (which the prompt left out)."""
    if item.type == "function_call":
        return _call_item(item.id, item.call_id, item.name, item.arguments, "completed")
    if item.type == "function_call_output":
        return {"type": item.type, "id": item.id, "call_id": item.call_id, "output": item.output, "status": "completed"}
    if item.type == "reasoning":
        return {"type": item.type, "id": item.id, "summary": []}
    if item.role == "assistant":
        return _message_item(item.id, item.content, "completed")
    return {"type": "message", "id": item.id, "role": item.role, "status": "completed",
            "content": [{"type": "input_text", "text": item.content}]}


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """A list as the openai SDK's cursor pages read it: the first `limit` items after the one whose id is `after`."""
    ids = [i["id"] for i in items]
    if after is not None:
        if after not in ids:
            raise APIError(400, f"after: there is no item {after!r} in this list", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def _retrieval(request: Request, stream: bool) -> None:
    """A kept response is retrieved whole: never streamed again (OpenAI streams again only background responses,
    which are not served), and its `include` (which the openai SDK sends as include[]) asks for nothing more."""
    if stream:
        raise APIError(400, "stream: a stored response cannot be streamed again (OpenAI streams only background "
                            "responses again, which are not supported)", param="stream")
    try:
        check_include([*request.query_params.getlist("include"), *request.query_params.getlist("include[]")])
    except ValueError as e:
        raise APIError(400, str(e), param="include") from None


RESPONSES_TERMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


def in_terms(e: APIError, terms: dict[str, str]) -> APIError:
    """A chat completion's error as an API served through the chat route names its fields (`terms`: chat's name ->
    that API's), in the message and the param."""
    names = re.compile(r"\b(" + "|".join(map(re.escape, terms)) + r")\b")

    def rename(text: str) -> str:
        return names.sub(lambda m: terms[m.group(1)], text)

    return APIError(e.status, rename(e.message), e.type, e.param and rename(e.param), e.code)


async def respond(svc: Service, thinks: bool, body: ResponsesRequest, request: Request, kept: KeptResponses):
    """A response by `svc`'s model, thinking by default when `thinks`: the chat completion the request translates
    to (ResponsesRequest.chat_request), its reply as output items; kept for previous_response_id unless store is
    false."""
    conversation = kept.conversation(body.previous_response_id)
    chat_body = body.chat_request(conversation)
    conversation = conversation + body.items
    rid, model = new_id("resp_"), body.model or svc.name

    def finished(response: dict) -> None:
        if body.store:
            kept.keep(response, conversation)

    try:
        prompt, params, started, with_calls, continued = await asyncio.to_thread(_chat_job, svc, thinks, chat_body)
        jobs = svc.submit(prompt, params, 1, asyncio.get_running_loop())
        # what every state of the response holds: the request's settings, the sampling they came to
        head = {"id": rid, "object": "response", "created_at": now(), "model": model, **body.echoed(),
                "temperature": params.temperature, "top_p": params.top_p}
        if body.stream:
            events = _ResponseEvents(head, finished)
            chunks = _chat_stream(svc, jobs, request, rid, head["created_at"], model, started, prompt, True, with_calls,
                                  continued)
            return await _sse(events.translate(chunks), request, frame=_named, failed=events.error, done=None)
        await _wait_all(svc, jobs, request)
    except APIError as e:
        raise in_terms(e, RESPONSES_TERMS) from None
    msg, finish = _reply(svc, jobs[0][0], started, with_calls, continued)
    response = _response(head, _output(msg, finish), finish, _usage(svc, prompt, jobs, started))
    finished(response)
    return response


def _response(head: dict, output: list[dict], finish: str | None = None, usage: dict | None = None) -> dict:
    """The Response object: in progress (no finish reason yet), completed, or incomplete when cut at
    max_output_tokens (or the context's end); usage from the chat's."""
    status = "in_progress" if finish is None else "incomplete" if finish == "length" else "completed"
    return {**head, "status": status, "error": None, "completed_at": now() if status == "completed" else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "output": output, "usage": usage and {
                "input_tokens": usage["prompt_tokens"], "input_tokens_details": usage["prompt_tokens_details"],
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": usage["completion_tokens_details"], "total_tokens": usage["total_tokens"]}}


def _output(msg: dict, finish: str) -> list[dict]:
    """A chat reply's message as output items: its reasoning, its text, its calls; the text or call it ends with is
    incomplete when the reply was cut short (an agent must not run a call the budget closed)."""
    def status(last: bool) -> str:
        return "incomplete" if last and finish == "length" else "completed"

    calls = msg.get("tool_calls") or []
    items = [_reasoning_item(new_id("rs_"), msg["reasoning_content"])] if msg.get("reasoning_content") else []
    if msg.get("content"):
        items.append(_message_item(new_id("msg_"), msg["content"], status(not calls)))
    return items + [_call_item(new_id("fc_"), c["id"], c["function"]["name"], c["function"]["arguments"],
                               status(k == len(calls) - 1)) for k, c in enumerate(calls)]


def _reasoning_item(iid: str, text: str) -> dict:  # vLLM's shape: the reasoning as it was written, no summary
    return {"type": "reasoning", "id": iid, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(iid: str, text: str, status: str) -> dict:
    return {"type": "message", "id": iid, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(iid: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": iid, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _named(event: dict) -> str:
    """An event as OpenAI sends the Responses API's: named by its type."""
    return f"event: {event['type']}\n{_data(event)}"


class _ResponseEvents:
    """The Responses API's stream, from a chat stream's chunks (_chat_stream's, with usage): the response created,
    then each stretch of reasoning, text or call as an output item (added, its content part, its deltas, done), then
    the whole response, completed or incomplete. Events are numbered in order; an error is one more event."""

    def __init__(self, head: dict, finished: Callable[[dict], None]):
        self.head, self.finished = head, finished
        self.seq, self.output = 0, []  # events sent; the items done
        self.item: dict | None = None  # the item being written, as it was added
        self.written = ""  # its text (or arguments) so far

    def event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def error(self, e: APIError) -> dict:
        e = in_terms(e, RESPONSES_TERMS)
        return self.event("error", code=e.code, message=e.message, param=e.param)

    async def translate(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        finish = usage = None
        async for chunk in chunks:
            if self.seq == 0:
                for kind in ("response.created", "response.in_progress"):
                    yield self.event(kind, response=_response(self.head, []))
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                finish = choice["finish_reason"] or finish
                for e in self.delta(choice["delta"]):
                    yield e
        for e in self.close(cut=finish == "length"):
            yield e
        response = _response(self.head, self.output, finish, usage)
        self.finished(response)
        yield self.event("response.incomplete" if finish == "length" else "response.completed", response=response)

    def delta(self, delta: dict) -> Iterator[dict]:
        if delta.get("reasoning_content"):
            yield from self.text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            yield from self.text("message", delta["content"])
        for call in delta.get("tool_calls") or []:
            if "id" in call:  # a call's first delta
                yield from self.open(_call_item(new_id("fc_"), call["id"], call["function"]["name"], "", "in_progress"))
            if more := call["function"].get("arguments"):
                self.written += more
                yield self.event("response.function_call_arguments.delta", **self.where(), delta=more)

    def text(self, kind: str, text: str) -> Iterator[dict]:
        if self.item is None or self.item["type"] != kind:  # added without content, as OpenAI adds them
            yield from self.open({**_reasoning_item(new_id("rs_"), ""), "content": []} if kind == "reasoning"
                                 else {**_message_item(new_id("msg_"), "", "in_progress"), "content": []})
        self.written += text
        if kind == "reasoning":
            yield self.event("response.reasoning_text.delta", **self.where(), content_index=0, delta=text)
        else:
            yield self.event("response.output_text.delta", **self.where(), content_index=0, delta=text, logprobs=[])

    def where(self) -> dict:
        return {"item_id": self.item["id"], "output_index": len(self.output)}

    def part(self, text: str) -> dict:  # the one content part of the item being written
        if self.item["type"] == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": []}

    def open(self, item: dict) -> Iterator[dict]:
        yield from self.close()
        self.item, self.written = item, ""
        yield self.event("response.output_item.added", output_index=len(self.output), item=item)
        if item["type"] != "function_call":
            yield self.event("response.content_part.added", **self.where(), content_index=0, part=self.part(""))

    def close(self, cut: bool = False) -> Iterator[dict]:
        """The item being written is done: incomplete if `cut` (the reply's last, cut short)."""
        if self.item is None:
            return
        item, text, where, status = self.item, self.written, self.where(), "incomplete" if cut else "completed"
        if item["type"] == "function_call":
            yield self.event("response.function_call_arguments.done", **where, arguments=text)
            done = {**item, "arguments": text, "status": status}
        elif item["type"] == "reasoning":
            yield self.event("response.reasoning_text.done", **where, content_index=0, text=text)
            done = _reasoning_item(item["id"], text)
        else:
            yield self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            done = _message_item(item["id"], text, status)
        if item["type"] != "function_call":
            yield self.event("response.content_part.done", **where, content_index=0, part=self.part(text))
        yield self.event("response.output_item.done", output_index=len(self.output), item=done)
        self.output.append(done)
        self.item = None


# ---- completions (with fill-in-the-middle) ----
class _Prompt(NamedTuple):
    ids: list[int]  # what the model reads
    text: str  # what echo shows
    hidden: int  # leading ids that are not in `text` (the BOS the server puts before a text prompt)


async def complete(svc: Service, body: CompletionRequest, request: Request):
    """Legacy completions: one prompt or several (text or token ids), n choices each (choice index =
    prompt index * n + k); echo, and logprobs in OpenAI's legacy shape, over the prompt too with echo."""
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 needs echo: true (the prompt is scored, nothing generated)",
                       param="max_tokens")
    if body.suffix is not None and body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs cannot be combined with suffix", param="suffix")
    prompts, params = await asyncio.to_thread(_completion_jobs, svc, body)
    drawn = body.best_of or body.n  # per prompt
    if drawn > body.n:  # ranked by their tokens' logprobs
        params = [replace(p, logprobs=True) for p in params]
    jobs = _submit_prompts(svc, prompts, params, drawn)
    cid, created, model = new_id("cmpl-"), now(), body.model or svc.name
    if body.stream:
        return await _sse(_completion_stream(svc, body, prompts, jobs, request, cid, created, model), request)
    await _wait_all(svc, jobs, request)
    # built and encoded off the event loop: echoed prompts' logprobs run to millions of entries (seconds of work)
    return await asyncio.to_thread(_completion_response, svc, body, prompts, jobs, drawn, cid, created, model)


def _best(jobs: list, drawn: int, n: int) -> list:
    """Of each prompt's `drawn` jobs the n whose tokens are likeliest on average (OpenAI's best_of), best first."""
    def score(job) -> float:
        lps = [e["logprob"] for e in job[0].logprobs]
        return sum(lps) / len(lps) if lps else 0.0

    return [job for i in range(0, len(jobs), drawn) for job in sorted(jobs[i:i + drawn], key=score, reverse=True)[:n]]


def _completion_response(svc: Service, body: CompletionRequest, prompts: list[_Prompt], jobs, drawn: int, cid: str,
                         created: int, model: str) -> JSONResponse:
    """The response's choices: the best n of each prompt's `drawn` jobs; the usage: all of them."""
    choices = []
    for i, (req, _) in enumerate(_best(jobs, drawn, body.n) if drawn > body.n else jobs):
        p = prompts[i // body.n]
        entries, hidden = (_prompt_entries(p, req) + req.logprobs, p.hidden) if body.echo else (req.logprobs, 0)
        choices.append({"index": i, "text": (p.text if body.echo else "") + req.text, "finish_reason": _finish(req.finish_reason),
                        "logprobs": None if body.logprobs is None else _legacy_logprobs(
                            svc, entries, 0, hidden, req.params.skip_token_ids, len(entries) - len(req.logprobs))})
    return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                         "usage": _completion_usage(svc, prompts, jobs, drawn)})


def _certainly_fits(svc: Service, texts: list[str], param: str) -> None:
    """Refuse texts too long for the context however they tokenize (no token is longer than the vocabulary's longest
    text) before tokenizing them: an 8 MB prompt took 10 s of CPU to be refused, and the tokenizer's threads kept the
    gigabyte it took."""
    chars, longest = sum(map(len, texts)), svc.tok.longest_token_chars
    if chars > svc.engine.max_len * longest:
        raise APIError(400, f"the prompt is over this model's context of {svc.engine.max_len} tokens: {chars:,} "
                            f"characters are at least {chars // longest:,} tokens", param=param,
                       code="context_length_exceeded")


def _completion_jobs(svc: Service, body: CompletionRequest) -> tuple[list[_Prompt], list[SamplingParams]]:
    """Each prompt ready for the engine, with its sampling parameters (off the event loop, like _chat_job)."""
    for p in body.prompts:
        _certainly_fits(svc, [p] if isinstance(p, str) else [], "prompt")
    prompts = [_completion_prompt(svc, body, p) for p in body.prompts]
    return prompts, [_completion_params(svc, body, p) for p in prompts]


def _unreadable(body: bytes) -> str:
    """Why a request body could not be read as JSON (its position where the JSON is broken)."""
    try:
        json.loads(body)
    except RecursionError:
        return "the request body nests deeper than a JSON reader goes (about 1,000 levels)"
    except json.JSONDecodeError as e:
        return f"the request body is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
    except UnicodeDecodeError as e:  # (a ValueError too)
        gzip = body[:2] == b"\x1f\x8b"
        return ("the request body is compressed (gzip): send it uncompressed" if gzip else
                f"the request body is not UTF-8 text (byte {e.start}: {body[e.start:e.start + 1]!r}); send JSON as UTF-8")
    except ValueError:  # (an integer past Python's limit of 4,300 digits)
        return "the request body holds a number too long to read (over 4,300 digits)"
    return "the request body is not valid JSON"


def _completion_prompt(svc: Service, body: CompletionRequest, prompt: str | list[int]) -> _Prompt:
    """Token ids are read as given; text after what the tokenizer puts before a text (its BOS: `encode_prompt`), and
    with `suffix` in the FIM layout after the BOS (PSM, as in pretraining). Text is text: control-token strings in it
    are not control tokens (send token ids for those)."""
    tok, vocab = svc.tok, svc.engine.config.vocab_size
    if isinstance(prompt, list):
        if body.suffix is not None:
            raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
        if max(prompt) >= vocab:
            raise APIError(400, f"prompt: token id {max(prompt)} is not in this model's vocabulary [0, {vocab})",
                           param="prompt")
        return _Prompt(prompt, tok.decode(prompt), 0)
    if body.suffix is None:
        ids, hidden = tok.encode_prompt(prompt)
        return _Prompt(ids, prompt, hidden)
    if tok.fim_begin_id is None:
        raise APIError(400, "this model has no fill-in-the-middle tokens: suffix is not supported", param="suffix")
    bos = [] if tok.bos_id is None else [tok.bos_id]
    return _Prompt(bos + fim_arrange(tok.encode_text(prompt), [], tok.encode_text(body.suffix), tok), prompt, 0)


def _completion_params(svc: Service, body: CompletionRequest, prompt: _Prompt) -> SamplingParams:
    """_sampling with the legacy logprobs (an integer: alternatives per token), over the prompt too with echo."""
    params = _sampling(svc, body, len(prompt.ids), body.max_tokens, svc.tok.special_ids)
    scored = body.logprobs is not None
    return replace(params, logprobs=scored, top_logprobs=body.logprobs or 0, prompt_logprobs=scored and body.echo)


def _submit_prompts(svc: Service, prompts: list[_Prompt], params: list[SamplingParams], n: int) -> list:
    """n jobs per prompt, in order; if one is refused, the ones already queued are cancelled."""
    svc.check_fits(len(prompts) * n, "n" if n > 1 else "prompt")
    jobs, loop = [], asyncio.get_running_loop()
    try:
        for p, sp in zip(prompts, params):
            jobs += svc.submit(p.ids, sp, n, loop, prompt_param="prompt")
    except APIError:
        for req, _ in jobs:
            svc.engine.cancel(req)
        raise
    return jobs


def _prompt_entries(prompt: _Prompt, req) -> list[dict]:
    """The prompt's logprob entries: the first token has none (nothing comes before it)."""
    return [{"token": prompt.ids[0], "logprob": None, "top": None}] + req.prompt_logprobs


def _legacy_logprobs(svc: Service, entries: list[dict], start: int, hidden: int = 0, skip=(), generated: int = 0) -> dict:
    """OpenAI's legacy logprobs object over the engine's logprob entries; text offsets count from
    `start`, and the first `hidden` tokens and the generated ones (from entry `generated` on) in `skip`
    (left out of the reply's text; an echoed prompt shows all of its tokens) take no room in it."""
    tokens = [_token_name(svc, e["token"]) for e in entries]
    # a token's offset: the characters before it as the text decodes them. Pieces of one character share its offset;
    # bytes that make no character are the U+FFFD the text shows, before the token that shows them so ("ignore" had
    # counted them as nothing: every later offset was short)
    utf8, chars, offsets = codecs.getincrementaldecoder("utf-8")("replace"), start, [start] * hidden
    for k, e in enumerate(entries[hidden:], hidden):
        if k >= generated and e["token"] in skip:
            offsets.append(chars)
            continue
        held = bool(utf8.getstate()[0])  # the start of a character, from the tokens before
        text = utf8.decode(svc.token_bytes(e["token"]))
        offsets.append(chars + (held and text.startswith("\ufffd")))  # ... which this token's bytes do not complete
        chars += len(text)
    # the chosen token is always among its alternatives, as OpenAI's "up to logprobs + 1" has it
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else {
                **{_token_name(svc, t): v for t, v in e["top"]}, _token_name(svc, e["token"]): e["logprob"]}
                for e in entries],
            "text_offset": offsets}


def _token_name(svc: Service, token: int) -> str:
    """A token as legacy logprobs name it: its text, or where that is no whole character (a byte of one, in a byte-level
    vocabulary) `bytes:` and its bytes escaped, as OpenAI writes them, so two such tokens keep two names."""
    raw = svc.token_bytes(token)
    try:
        raw.decode("utf-8")
        return svc.tok.decode([token])
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _completion_usage(svc: Service, prompts: list[_Prompt], jobs, n: int) -> dict:
    """_usage summed over the prompts (each with its n choices)."""
    return reduce(_summed, (_usage(svc, p.ids, jobs[i * n:(i + 1) * n]) for i, p in enumerate(prompts)))


def _summed(a: dict, b: dict) -> dict:
    """Two usage objects added field by field."""
    return {k: _summed(a[k], v) if isinstance(v, dict) else a[k] + v for k, v in b.items()}


async def _completion_stream(svc: Service, body: CompletionRequest, prompts: list[_Prompt], jobs, request: Request,
                             cid: str, created: int, model: str) -> AsyncIterator[dict]:
    """With echo, each choice's prompt first (when its prefill is done); then the text of each event with
    the logprobs of the tokens it holds (tokens whose text is held back go with the next text); then
    the finish reason."""
    shown, pending = [0] * len(jobs), [[] for _ in jobs]  # characters sent; logprob entries not yet sent

    def chunk(i: int, text: str, finish: str | None = None, hidden: int = 0, echo: bool = False) -> dict:
        lp = None
        if body.logprobs is not None and pending[i]:
            skip = () if echo else jobs[i][0].params.skip_token_ids
            lp, pending[i] = _legacy_logprobs(svc, pending[i], shown[i], hidden, skip), []
        shown[i] += len(text)
        return _completion_chunk(cid, created, model, i, text, finish, lp)

    echoed = set()
    async for i, ev in _merged_events(svc, jobs, request):
        req = jobs[i][0]
        if body.echo and i not in echoed:
            echoed.add(i)
            p = prompts[i // body.n]
            pending[i] = _prompt_entries(p, req) if req.params.prompt_logprobs else []
            yield chunk(i, p.text, hidden=p.hidden, echo=True)
        pending[i] += ev.logprobs
        if ev.text:
            yield chunk(i, ev.text)
        if ev.finish_reason is not None:
            yield chunk(i, "", _finish(ev.finish_reason))
    if body.stream_options and body.stream_options.include_usage:
        yield {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": _completion_usage(svc, prompts, jobs, body.n)}


def _completion_chunk(cid, created, model, index, text, finish, logprobs=None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}


# ---- plumbing ----
def _finish(reason: str | None) -> str:
    """The finish_reason of a request that ended well (a failed one is an error instead: _failure). A
    stream takes it from its last event: the request's own is set by the engine a moment after that
    event is sent (streams said "stop" for replies cut at max_tokens)."""
    return "length" if reason == "length" else "stop"


class ClientGone(Exception):
    """The client hung up before its reply was ready (its requests are cancelled; nothing to answer)."""


def _failure(req) -> APIError | None:
    """The error a request ended with, if it failed inside the engine or the server cancelled it (shutting down)."""
    if req.finish_reason == "error" and isinstance(req.error, GrammarError):  # the request's schema: its fault
        return APIError(400, f"the JSON schema asked for (response_format or tools) cannot be followed: {req.error}")
    if req.finish_reason == "error":
        return APIError(500, "generation failed inside the engine", "server_error")
    if req.finish_reason == "cancelled":
        return APIError(503, "generation was cancelled by the server", "server_error", code="cancelled")
    return None


async def _wait_all(svc: Service, jobs, request: Request) -> None:
    """Wait for every job; a client that disconnects cancels them (checked twice a second, also
    while tokens flow)."""
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        for req, q in jobs:
            while not req.finished:
                try:
                    if (await asyncio.wait_for(q.get(), timeout=0.5)).finish_reason is not None:
                        while not req.finished:  # the engine marks it finished right after its last event
                            await asyncio.sleep(0.001)  # (waiting out the timeout added 0.5 s to every reply)
                except asyncio.TimeoutError:
                    pass
                if loop.time() - checked >= 0.5:
                    checked = loop.time()
                    if await request.is_disconnected():
                        raise ClientGone
    except (asyncio.CancelledError, ClientGone):
        for req, _ in jobs:
            svc.engine.cancel(req)
        raise
    for req, _ in jobs:
        if (e := _failure(req)) is not None:
            raise e


async def _merged_events(svc: Service, jobs, request: Request) -> AsyncIterator[tuple[int, object]]:
    """(choice index, event) from all jobs as they arrive, until every job has finished; a job that
    failed raises its API error."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i, q):
        while True:
            ev = await q.get()
            await merged.put((i, ev))
            if ev.finish_reason is not None:
                return

    tasks = [asyncio.create_task(pump(i, q)) for i, (_, q) in enumerate(jobs)]
    left = len(jobs)
    try:
        while left:
            i, ev = await merged.get()
            if ev.finish_reason is not None:
                left -= 1
                if (e := _failure(jobs[i][0])) is not None:
                    raise e
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        for req, _ in jobs:  # a client that went away (or an early exit) stops its generations
            if not req.finished:
                svc.engine.cancel(req)


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    """first, then what rest yields."""
    yield first
    async for x in rest:
        yield x


def _data(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


async def _sse(events: AsyncIterator[dict], request: Request, frame: Callable[[dict], str] = _data,
               failed: Callable[[APIError], dict] = APIError.body, done: str | None = "data: [DONE]\n\n"
               ) -> StreamingResponse:
    """Server-sent events (each written by `frame`), then `done` if any; a failure ends the stream with the event
    `failed` makes of its error instead. The first event is awaited (up to FIRST_EVENT_WAIT seconds, the client
    checked twice a second) before the response starts, so a request that fails at once (a schema no reply can
    follow) is answered with its HTTP error rather than a stream that opens and reports it; a later failure ends
    the stream with an error event. A request still queued or prefilling by then streams as usual (headers go
    out: proxies with a time-to-first-byte limit keep the connection)."""
    events = aiter(events)
    first = asyncio.ensure_future(anext(events, None))
    deadline = asyncio.get_running_loop().time() + FIRST_EVENT_WAIT
    while not first.done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.wait({first}, timeout=0.5)
        if not first.done() and await request.is_disconnected():
            first.cancel()  # (the generator's cleanup cancels its generations)
            raise ClientGone
    if first.done():
        first.result()  # an error before the first event: raised here, answered with its status

    async def body():
        try:
            head = await first
            async for e in events if head is None else _prepend(head, events):
                yield frame(e)
        except APIError as e:
            yield frame(failed(e))
            return
        except Exception:  # a bug: the client learns the stream failed, never a traceback
            yield frame(failed(APIError(500, "internal error", "server_error")))
            return
        if done:
            yield done

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["APIError", "Service", "create_app"]
