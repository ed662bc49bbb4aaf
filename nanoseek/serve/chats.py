"""The chat web app's conversation routes, over the SQLite store (store.py).

    GET    /api/conversations             list (newest first)
    POST   /api/conversations             create {title?, system?, settings?}
    GET    /api/conversations/{id}        one, with its messages
    PATCH  /api/conversations/{id}        rename / change system prompt or settings
    PUT    /api/conversations/{id}/messages   replace the messages (after a reply, an edit, a regenerate)
    DELETE /api/conversations/{id}

The page sends the whole message list after each change, so editing and regenerating are just
rewrites of the list. A missing conversation is a 404.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from .protocol import APIError
from .store import ChatStore, NotFound


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class NewConversation(_Body):
    title: str = Field("New chat", max_length=200)
    system: str = Field("", max_length=20_000)
    settings: dict = Field(default_factory=dict)


class ConversationPatch(_Body):
    title: str | None = Field(None, min_length=1, max_length=200)
    system: str | None = Field(None, max_length=20_000)
    settings: dict | None = None


class StoredMessage(_Body):
    role: str = Field(..., pattern="^(user|assistant)$")
    content: str = Field(..., max_length=1_000_000)
    reasoning_content: str | None = Field(None, max_length=1_000_000)


class MessageList(_Body):
    messages: list[StoredMessage] = Field(..., max_length=10_000)


@contextmanager
def _found() -> Iterator[None]:
    """The store's NotFound as the API's 404."""
    try:
        yield
    except NotFound as e:
        raise APIError(404, str(e), code="not_found") from None


def routes(store: ChatStore) -> APIRouter:
    """The conversation routes over `store` (the API key is checked by the router they are included in)."""
    r = APIRouter(prefix="/api/conversations")

    @r.get("")
    async def list_():
        return {"data": store.list()}

    @r.post("")
    async def create(body: NewConversation):
        return store.create(body.title, body.system, body.settings)

    @r.get("/{cid}")
    async def get(cid: str):
        with _found():
            return store.get(cid)

    @r.patch("/{cid}")
    async def patch(cid: str, body: ConversationPatch):
        with _found():
            return store.update(cid, title=body.title, system=body.system, settings=body.settings)

    @r.put("/{cid}/messages")
    async def put_messages(cid: str, body: MessageList):
        with _found():
            return store.set_messages(cid, [m.model_dump() for m in body.messages])

    @r.delete("/{cid}")
    async def delete(cid: str):
        with _found():
            store.delete(cid)
        return {"deleted": cid}

    return r
