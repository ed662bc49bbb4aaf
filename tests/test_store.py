"""The web app's conversation store: create, rename, replace messages, delete, and survive a restart."""

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
