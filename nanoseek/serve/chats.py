"""The chat web app's routes: its conversations, over the SQLite store (store.py), and its built-in tools.

    GET    /api/conversations?q=text      list (newest first); with q, those whose title or messages hold it
    POST   /api/conversations             create {id?, title?, system?, settings?} (an existing id: that one)
    GET    /api/conversations/{id}        one, with its messages
    PATCH  /api/conversations/{id}        rename / change system prompt or settings
    PUT    /api/conversations/{id}/messages   replace the messages (after a reply, an edit, a regenerate);
                                               {messages, base?}: base, the `revision` read, refuses (409)
                                               if another tab changed them since
    DELETE /api/conversations/{id}
    GET    /api/tools?model=name          the built-in tools a model can call (none if its template has no calls)
    POST   /api/tools/{name}              run one {arguments: "<JSON>"} -> {content: "<result text>"}
    GET    /api/examples?model=name       what a model does well, from its folder's examples.json

The page sends the whole message list after each change, so editing and regenerating are just
rewrites of the list (a write past the store's limits is a 413, code "quota_exceeded"); a tool
round is an assistant message with `tool_calls` followed by one `tool` message (with its
`tool_call_id`) per call. The page picks a new conversation's id, so creating it again after a
lost answer is harmless. A missing conversation is a 404. The page runs
the calls its model makes through POST /api/tools/{name}: only the built-in tools below, which
are pure functions (the calculator walks an AST, never `eval`), can run; any other name is a 404.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AfterValidator, Field, model_validator

from ..tools import CALCULATOR, run_calculator
from .protocol import MAX_MESSAGES, APIError, StrictBody, ToolCall
from .store import ChatStore, Conflict, NotFound, QuotaExceeded


def _small_settings(settings: dict) -> dict:
    if any(isinstance(v, str) and len(v) > SETTING_CHARS for v in settings.values()):
        raise ValueError(f"each value of settings holds at most {SETTING_CHARS} characters")
    return settings


SETTINGS_ITEMS, SETTING_CHARS = 32, 1000
# a conversation's settings: a few named values (a temperature, a model), not a store for anything
Settings = Annotated[dict[Annotated[str, Field(max_length=64)], str | int | float | bool | None],
                     Field(max_length=SETTINGS_ITEMS), AfterValidator(_small_settings)]


class NewConversation(StrictBody):
    id: str | None = Field(None, pattern="^[0-9a-f]{32}$")
    title: str = Field("New chat", max_length=200)
    system: str = Field("", max_length=20_000)
    settings: Settings = Field(default_factory=dict)


class ConversationPatch(StrictBody):
    title: str | None = Field(None, min_length=1, max_length=200)
    system: str | None = Field(None, max_length=20_000)
    settings: Settings | None = None


class StoredMessage(StrictBody):
    role: str = Field(..., pattern="^(user|assistant|tool)$")
    content: str | None = Field(..., max_length=1_000_000)  # None: an assistant turn with only tool calls
    reasoning_content: str | None = Field(None, max_length=1_000_000)
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)  # assistant turns
    tool_call_id: str | None = Field(None, max_length=200)  # tool turns: the call answered
    info: dict[str, str | int | float | bool] | None = Field(None, max_length=16)  # the page's note on a reply

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"{self.role} messages need content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages, and only they, have a tool_call_id")
        return self


class MessageList(StrictBody):
    messages: list[StoredMessage] = Field(..., max_length=MAX_MESSAGES)  # fewer may fit: the store's limit
    base: str | None = Field(None, max_length=64)  # the `revision` the page read: changed since, a 409


class ToolRun(StrictBody):
    arguments: str = Field(..., max_length=10_000)  # the call's arguments, a JSON object as text


# name -> (the definition sent to the model, the function: JSON arguments as text -> the result as text)
BUILTIN_TOOLS = {CALCULATOR["function"]["name"]: (CALCULATOR, run_calculator)}


@contextmanager
def _store_errors() -> Iterator[None]:
    """The store's NotFound as the API's 404, QuotaExceeded as a 413, Conflict as a 409."""
    try:
        yield
    except Conflict as e:
        raise APIError(409, str(e), code="conflict") from None
    except NotFound as e:
        raise APIError(404, str(e), code="not_found") from None
    except QuotaExceeded as e:
        raise APIError(413, str(e), code="quota_exceeded") from None


def routes(store: ChatStore) -> APIRouter:
    """The conversation routes over `store` (the API key is checked by the server's Guard). They are
    plain functions, which FastAPI runs in its thread pool: SQLite never blocks the event loop."""
    r = APIRouter(prefix="/api/conversations")

    @r.get("")
    def list_(q: str = Query("", max_length=200)):
        return {"data": store.list(q)}

    @r.post("")
    def create(body: NewConversation):
        with _store_errors():
            return store.create(body.title, body.system, body.settings, cid=body.id)

    @r.get("/{cid}")
    def get(cid: str):
        with _store_errors():
            return store.get(cid)

    @r.patch("/{cid}")
    def patch(cid: str, body: ConversationPatch):
        with _store_errors():
            return store.update(cid, title=body.title, system=body.system, settings=body.settings)

    @r.put("/{cid}/messages")
    def put_messages(cid: str, body: MessageList):
        with _store_errors():
            return store.set_messages(cid, [m.model_dump() for m in body.messages], body.base)

    @r.delete("/{cid}")
    def delete(cid: str):
        with _store_errors():
            store.delete(cid)
        return {"deleted": cid}

    return r


def tool_routes(usable: Callable[[str | None], bool]) -> APIRouter:
    """The built-in tool routes; `usable(model)` says whether a served model (None: the first) can call them."""
    r = APIRouter(prefix="/api/tools")

    @r.get("")
    async def list_(model: str | None = Query(None, max_length=200)):
        return {"data": [spec for spec, _ in BUILTIN_TOOLS.values()] if usable(model) else []}

    @r.post("/{name}")
    async def run(name: str, body: ToolRun):
        if name not in BUILTIN_TOOLS:
            raise APIError(404, f"no built-in tool {name!r}; the built-in tools are {sorted(BUILTIN_TOOLS)}",
                           code="not_found")
        return {"content": await asyncio.to_thread(BUILTIN_TOOLS[name][1], body.arguments)}

    return r


EXAMPLES_FILE = "examples.json"  # in a model folder: {"about": "...", "examples": [{"title": ..., "prompt": ...}]}
NO_EXAMPLES = {"about": "", "examples": []}


def read_examples(folder: Path) -> dict:
    """What a model folder says its model does well, for the web app's welcome screen (none without
    the file: the page then shows a generic welcome); a malformed file is a ValueError naming it."""
    path = Path(folder) / EXAMPLES_FILE
    if not path.is_file():
        return NO_EXAMPLES
    try:
        data = json.loads(path.read_text())
        examples = [{"title": str(e["title"]), "prompt": str(e["prompt"])} for e in data.get("examples", [])]
        return {"about": str(data.get("about", "")), "examples": examples}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f'{path}: expected {{"about": "...", "examples": [{{"title": "...", "prompt": "..."}}]}} '
                         f"({type(e).__name__}: {e})") from None


def example_routes(examples: Callable[[str | None], dict]) -> APIRouter:
    """GET /api/examples?model=name: a served model's (None: the first) `examples` (read_examples' dict)."""
    r = APIRouter()

    @r.get("/api/examples")
    async def list_(model: str | None = Query(None, max_length=200)):
        return examples(model)

    return r
