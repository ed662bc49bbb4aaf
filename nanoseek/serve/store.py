"""Conversations of the chat web app, kept server-side in SQLite (WAL mode); their routes are in chats.py.

Each write is one transaction; a server restart finds everything again. A missing conversation
raises NotFound; a write past the store's `Limits` raises QuotaExceeded; messages written over ones the
writer had not read (`revision`) raise Conflict. Messages keep what a
tool round needs: an assistant turn's `tool_calls` (JSON) and a tool turn's `tool_call_id`, plus
the page's note on a reply (`info`: its thinking time, speed, whether it was stopped); a database
from before those columns gets them when it opens. One connection serves every thread,
one call at a time (a lock), so the server can run store calls off its event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, system TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
    reasoning TEXT NOT NULL DEFAULT '', tool_calls TEXT NOT NULL DEFAULT '',
    tool_call_id TEXT NOT NULL DEFAULT '', info TEXT NOT NULL DEFAULT '', PRIMARY KEY (conversation_id, position));
"""
ADDED = {"tool_calls": "TEXT NOT NULL DEFAULT ''", "tool_call_id": "TEXT NOT NULL DEFAULT ''",
         "info": "TEXT NOT NULL DEFAULT ''"}  # columns newer than v1


def default_path() -> Path:
    """Where `nanoseek serve` keeps chats: the user's data folder ($XDG_DATA_HOME, else ~/.local/share)
    /nanoseek/chats.db, never a model folder (a model folder is re-exported, shared, uploaded).
    An older nanoseek kept them in ~/.nanoseek/chats.db: that file is used while no new one exists."""
    new = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "nanoseek" / "chats.db"
    old = Path.home() / ".nanoseek" / "chats.db"
    return old if old.is_file() and not new.exists() else new


class NotFound(LookupError):
    """No conversation with that id."""


class QuotaExceeded(ValueError):
    """A write that would take the store past its limits."""


class Conflict(ValueError):
    """Messages written over a version of them the writer had not seen (another tab changed them)."""


@dataclass(frozen=True)
class Limits:
    conversations: int = 10_000
    messages: int = 2_000  # in one conversation
    chars: int = 4_000_000  # of one conversation's messages (content, reasoning, tool calls)
    bytes: int = 2 << 30  # of the database file


class ChatStore:
    def __init__(self, path: str | Path, limits: Limits = Limits()):
        self.path, self.limits = Path(path), limits
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
        for column, kind in ADDED.items():  # an older database: add the missing columns, keep every row
            if column not in have:
                self._db.execute(f"ALTER TABLE messages ADD COLUMN {column} {kind}")
        self._lock = threading.RLock()

    def _tx(self, fn):
        """fn(db) in one transaction, under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
                self._db.execute("COMMIT")
                return out
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def list(self, query: str = "") -> list[dict]:
        """Newest first; with a query, those whose title or a message holds it (case-insensitive for ASCII).
        A query with a NUL matches nothing (SQLite's LIKE would end the pattern there and match its start)."""
        if "\x00" in query:
            return []
        like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._lock:
            rows = self._db.execute(
                "SELECT id, title, updated FROM conversations WHERE ? = '' OR title LIKE ? ESCAPE '\\' OR id IN "
                "(SELECT conversation_id FROM messages WHERE content LIKE ? ESCAPE '\\') ORDER BY updated DESC",
                (query, like, like)).fetchall()
        return [{"id": i, "title": t, "updated": u} for i, t, u in rows]

    def create(self, title: str = "New chat", system: str = "", settings: dict | None = None,
               cid: str | None = None) -> dict:
        """A new conversation; given an id that exists already, that one (so a repeated create is harmless)."""
        cid, t = cid or uuid.uuid4().hex, time.time()

        def insert(db):
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone():
                return
            self._check_room(db)
            (n,), = db.execute("SELECT COUNT(*) FROM conversations").fetchall()
            if n >= self.limits.conversations:
                raise QuotaExceeded(f"the store holds its limit of {self.limits.conversations} conversations; "
                                    "delete some first")
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?)",
                       (cid, title, system, json.dumps(settings or {}), t, t))

        self._tx(insert)
        return self.get(cid)

    def get(self, cid: str) -> dict:
        with self._lock:
            row = self._db.execute("SELECT id, title, system, settings, created, updated FROM conversations "
                                   "WHERE id = ?", (cid,)).fetchone()
            if row is None:
                raise NotFound(f"no conversation {cid!r}")
            messages = _messages(self._db, cid)
        return {"id": row[0], "title": row[1], "system": row[2], "settings": json.loads(row[3]),
                "created": row[4], "updated": row[5], "messages": messages, "revision": revision(messages)}

    def update(self, cid: str, **fields) -> dict:
        sets = {k: (json.dumps(v) if k == "settings" else v) for k, v in fields.items() if v is not None}
        sets["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in sets)
        self._tx(lambda db: _found(db.execute(f"UPDATE conversations SET {cols} WHERE id = ?", (*sets.values(), cid)),
                                   cid))
        return self.get(cid)

    def set_messages(self, cid: str, messages: list[dict], base: str | None = None) -> dict:
        """Replace the messages; with `base` (the `revision` the writer last read) only if they are still
        those: else Conflict, and nothing is written (two tabs on one conversation each wrote theirs over
        the other's)."""
        rows = [(cid, i, m["role"], m.get("content") or "", m.get("reasoning_content") or "",
                 json.dumps(m["tool_calls"]) if m.get("tool_calls") else "", m.get("tool_call_id") or "",
                 json.dumps(m["info"]) if m.get("info") else "")
                for i, m in enumerate(messages)]
        if len(rows) > self.limits.messages:
            raise QuotaExceeded(f"{len(rows)} messages is over the limit of {self.limits.messages} in one conversation")
        chars = sum(len(text) for r in rows for text in r[3:])  # content, reasoning, tool calls, call id, info
        if chars > self.limits.chars:
            raise QuotaExceeded(f"the messages hold {chars} characters, over the limit of {self.limits.chars} "
                                "in one conversation")

        def write(db):
            self._check_room(db)
            _found(db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), cid)), cid)
            if base is not None and revision(_messages(db, cid)) != base:
                raise Conflict("this conversation's messages were changed elsewhere (another tab?) since they were "
                               "read; reload it")
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (cid,))
            db.executemany("INSERT INTO messages (conversation_id, position, role, content, reasoning, tool_calls, "
                           "tool_call_id, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

        self._tx(write)
        return self.get(cid)

    def delete(self, cid: str) -> None:
        self._tx(lambda db: _found(db.execute("DELETE FROM conversations WHERE id = ?", (cid,)), cid))

    def _check_room(self, db) -> None:
        (pages,), = db.execute("PRAGMA page_count").fetchall()
        (free,), = db.execute("PRAGMA freelist_count").fetchall()  # pages deleted rows left: reused first
        (size,), = db.execute("PRAGMA page_size").fetchall()
        used = (pages - free) * size
        if used >= self.limits.bytes:
            raise QuotaExceeded(f"the store is full ({used >> 20} MiB of {self.limits.bytes >> 20} MiB); "
                                "delete conversations first")


def _found(cursor: sqlite3.Cursor, cid: str) -> None:
    """A statement on one conversation changed it, else NotFound."""
    if cursor.rowcount == 0:
        raise NotFound(f"no conversation {cid!r}")


def revision(messages: list[dict]) -> str:
    """A short fingerprint of a conversation's messages: what a writer read, to check they are unchanged."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def _messages(db, cid: str) -> list[dict]:
    rows = db.execute("SELECT role, content, reasoning, tool_calls, tool_call_id, info FROM messages "
                      "WHERE conversation_id = ? ORDER BY position", (cid,)).fetchall()
    return [_message(*m) for m in rows]


def _message(role: str, content: str, reasoning: str, tool_calls: str, tool_call_id: str, info: str) -> dict:
    """A stored row as the message the page sends: optional fields only where set."""
    m = {"role": role, "content": content if content or not tool_calls else None}  # a turn of calls alone: null
    if reasoning:
        m["reasoning_content"] = reasoning
    if tool_calls:
        m["tool_calls"] = json.loads(tool_calls)
    if tool_call_id:
        m["tool_call_id"] = tool_call_id
    if info:
        m["info"] = json.loads(info)
    return m
