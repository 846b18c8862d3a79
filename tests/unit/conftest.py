"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest

from middleware.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path):
    """A fresh SQLite store in the test's own folder, closed afterwards."""
    opened = SqliteStore(str(tmp_path / "store.db"))
    await opened.open()
    yield opened
    await opened.close()
