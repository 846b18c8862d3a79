"""Unit: the SQLite store's WAL checkpoint thread."""
from __future__ import annotations

import asyncio
import os

from middleware.store.base import Change
from middleware.store.sqlite import SqliteStore


async def test_the_checkpoint_thread_copies_the_wal_back_and_stops_on_close(tmp_path):
    """Writes land in the WAL; the thread copies them into the database file; close() joins the thread."""
    path = tmp_path / "store.db"
    store = SqliteStore(str(path))
    await store.open()
    size_before = os.path.getsize(path)
    doc = {"id": "urn:e:1", "type": ["T"], "createdAt": "x", "modifiedAt": "x", "attrs": {"a": [{"type": "Property",
                                                                                                 "value": "v" * 20000}]}}
    await store.write("", [Change("insert", "urn:e:1", doc, None, ["T"], [], [])])
    thread = store._checkpointer._thread
    assert thread.is_alive()
    for _ in range(100):  # the thread runs every 0.25 s; the writer itself would not checkpoint below 8,000 pages
        if os.path.getsize(path) > size_before + 20000:
            break
        await asyncio.sleep(0.05)
    assert os.path.getsize(path) > size_before + 20000  # the 20 kB document is in the database file itself
    await store.close()
    assert not thread.is_alive()
