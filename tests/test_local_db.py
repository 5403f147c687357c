"""The gateway's local SQLite files: transactions on one thread, durable by default."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from datahaul.gateway.local_db import GroupCommit, LocalDatabase

SCHEMA = "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, note TEXT);"
FULL = 2


def synchronous(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA synchronous").fetchone()[0])


def insert(note: str) -> Callable[[sqlite3.Connection], object]:
    return lambda db: db.execute("INSERT INTO rows (note) VALUES (?)", (note,))


def count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM rows").fetchone()[0])


@pytest.fixture
def database(tmp_path: Path) -> Iterator[LocalDatabase]:
    opened = LocalDatabase(tmp_path / "local.db", SCHEMA, synchronous="FULL")
    yield opened
    opened.close()


async def test_a_commit_that_does_not_wait_for_the_disk_still_applies(
    database: LocalDatabase,
) -> None:
    """durable=False commits the change, and the next transaction waits for
    the disk again."""
    await database.run(insert("forget me"), durable=False)

    assert await database.run(count) == 1
    assert await database.run(synchronous) == FULL


async def test_a_failed_transaction_rolls_back_and_restores_durability(
    database: LocalDatabase,
) -> None:
    """A failing non-durable transaction leaves nothing behind, not even its
    relaxed setting."""

    def fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO rows (note) VALUES ('half')")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await database.run(fail, durable=False)

    assert await database.run(count) == 0
    assert await database.run(synchronous) == FULL


async def test_a_read_on_the_calling_thread_sees_what_was_committed(
    database: LocalDatabase,
) -> None:
    await database.run(insert("first"))
    assert database.read_here(count) == 1

    await database.run(insert("second"))
    assert database.read_here(count) == 2


async def test_a_gathering_put_waits_for_company_and_a_flush_cuts_it_short(
    database: LocalDatabase,
) -> None:
    """Notes put one by one share a commit; nothing is lost by flushing early."""
    commits: list[list[str]] = []

    def write(db: sqlite3.Connection, notes: list[str]) -> None:
        commits.append(notes)
        db.executemany("INSERT INTO rows (note) VALUES (?)", [(n,) for n in notes])

    writes = GroupCommit(database, write, put_gathers_for=0.05)
    writes.put("a")
    writes.put("b")
    await asyncio.sleep(0.01)
    assert commits == []

    for _ in range(500):
        if commits:
            break
        await asyncio.sleep(0.01)
    assert commits == [["a", "b"]]

    writes.put("c")
    await writes.flush()
    assert commits == [["a", "b"], ["c"]]
    assert database.read_here(count) == 3
