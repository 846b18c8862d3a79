"""Context stores: SQLite (embedded default) and PostgreSQL (shared by several processes)."""
from __future__ import annotations

from .base import Store


def open_store(url: str) -> Store:
    """The store named by a URL: sqlite:///<path>, sqlite:///:memory: or postgresql://..."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore
        return PostgresStore(url)
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore
        return SqliteStore(url[len("sqlite:///"):])
    raise ValueError(f"unknown store URL {url!r}: use sqlite:///<path> or postgresql://...")
