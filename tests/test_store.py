"""The web app's conversation store: create, rename, replace messages, delete, survive a restart, keep tool
calls and results, and open a database written before tool calls were stored."""

import json
import sqlite3

import pytest

from nanoseek.serve.store import ChatStore, NotFound


def test_store_round_trip_and_restart(tmp_path):
    db = tmp_path / "chats.db"
    store = ChatStore(db)
    a = store.create("first", system="be brief")
    b = store.create()
    store.set_messages(a["id"], [{"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4", "reasoning_content": "2+2+0=4"}])
    store.update(b["id"], title="renamed", settings={"temperature": 0.2})
    assert [c["title"] for c in store.list()] == ["renamed", "first"]  # most recently updated first
    store.delete(b["id"])
    with pytest.raises(NotFound, match="no conversation"):
        store.get(b["id"])
    del store  # a server restart: a new connection to the same file
    again = ChatStore(db)
    got = again.get(a["id"])
    assert got["system"] == "be brief" and got["messages"][1] == {"role": "assistant", "content": "4",
                                                                    "reasoning_content": "2+2+0=4"}
    assert [c["id"] for c in again.list()] == [a["id"]]
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def call(cid: str, expression: str) -> dict:
    return {"id": cid, "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}


TOOL_ROUND = [
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": None, "tool_calls": [call("call_1", "17 * 23"), call("call_2", "1/0")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "391"},
    {"role": "tool", "tool_call_id": "call_2", "content": "error: division by zero"},
    {"role": "assistant", "content": "391", "reasoning_content": "the calculator says so"}]


def test_tool_calls_and_results_round_trip(tmp_path):
    store = ChatStore(tmp_path / "chats.db")
    cid = store.create()["id"]
    assert store.set_messages(cid, TOOL_ROUND)["messages"] == TOOL_ROUND
    assert ChatStore(tmp_path / "chats.db").get(cid)["messages"] == TOOL_ROUND  # after a restart too


def test_a_database_from_before_tool_calls_opens_and_keeps_its_messages(tmp_path):
    db = tmp_path / "chats.db"
    old = sqlite3.connect(db)  # the first schema: messages without tool_calls / tool_call_id
    old.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, system TEXT NOT NULL DEFAULT '',
            settings TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE messages (conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            position INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
            reasoning TEXT NOT NULL DEFAULT '', PRIMARY KEY (conversation_id, position));
        INSERT INTO conversations VALUES ('old', 'kept', 'be brief', '{}', 1.0, 2.0);
        INSERT INTO messages VALUES ('old', 0, 'user', 'hi', ''), ('old', 1, 'assistant', 'hello', 'greet back');""")
    old.commit()
    old.close()
    store = ChatStore(db)
    got = store.get("old")
    assert got["title"] == "kept" and got["messages"] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}]
    assert store.set_messages("old", TOOL_ROUND)["messages"] == TOOL_ROUND  # the new columns work
    assert ChatStore(db).get("old")["messages"] == TOOL_ROUND  # and opening it again changes nothing

