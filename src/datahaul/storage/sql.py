"""One small SQL layer over SQLite (embedded) and PostgreSQL (production).

Both speak the same statements; only the placeholders, the binary column
type and how a write transaction starts differ. Calls are blocking: the
async parts of datahaul run them in threads, each thread with its own
connection, which is what both drivers want.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import psycopg

from datahaul.errors import ConfigError, StorageError

Row = tuple[Any, ...]

DATABASE_FAILURES: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Row | None: ...
    def fetchall(self) -> list[Row]: ...


class Database:
    """A connection per thread to one database, named by a URL."""

    dialect: str
    blob_type: str

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()

    def connect(self) -> Any:
        raise NotImplementedError

    def sql(self, statement: str) -> str:
        return statement

    @property
    def connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self.connect()
            self._local.connection = connection
        return connection

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Transaction]:
        """A write transaction: committed on success, rolled back on error.

        `durable=False` lets the commit return before the disk has it: a
        crash can lose such a commit whole, never half of it. It is for
        changes whose loss is harmless, such as noting that an event went
        out (the sweep then sends it again).
        """
        connection = self.connection
        try:
            if not durable:
                self._relax(connection)
            self._begin(connection)
            yield Transaction(self, connection)
            connection.commit()
        except BaseException:
            with contextlib.suppress(*DATABASE_FAILURES):
                connection.rollback()
            raise
        finally:
            if not durable:
                self._restore_or_drop(connection)

    def _restore_or_drop(self, connection: Any) -> None:
        # A connection left relaxed would weaken every later commit on it.
        try:
            self._restore(connection)
        except DATABASE_FAILURES:
            self.close()

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        """A read outside any write transaction."""
        connection = self.connection
        try:
            rows: list[Row] = connection.execute(self.sql(statement), params).fetchall()
        finally:
            connection.rollback()
        return rows

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _begin(self, connection: Any) -> None:
        pass

    def _relax(self, connection: Any) -> None:
        """Before the transaction: let its commit skip waiting for the disk."""

    def _restore(self, connection: Any) -> None:
        """Undo `_relax` once the transaction is over."""


class Transaction:
    def __init__(self, database: Database, connection: Any) -> None:
        self._database = database
        self._connection = connection

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Cursor:
        cursor: Cursor = self._connection.execute(self._database.sql(statement), params)
        return cursor

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        cursor = self._connection.cursor()
        cursor.executemany(self._database.sql(statement), rows)


class SQLiteDatabase(Database):
    dialect = "sqlite"
    blob_type = "BLOB"

    def __init__(self, url: str, path: Path) -> None:
        super().__init__(url)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def connect(self) -> Any:
        # Several worker processes share the file: WAL lets readers run
        # beside the one writer, and FULL makes a commit survive power loss,
        # which is what lets a worker ack a packet after committing it.
        connection = sqlite3.connect(
            self.path, timeout=60.0, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA busy_timeout=60000")
        _use_wal(connection)
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
        return _AutoBegin(connection)

    def _begin(self, connection: Any) -> None:
        # IMMEDIATE takes the write lock up front, so two processes never
        # deadlock upgrading their read locks.
        connection.execute("BEGIN IMMEDIATE")

    def _relax(self, connection: Any) -> None:
        # In WAL mode NORMAL skips the commit's fsync, and the next FULL
        # commit makes this one durable too.
        connection.execute("PRAGMA synchronous=NORMAL")

    def _restore(self, connection: Any) -> None:
        connection.execute("PRAGMA synchronous=FULL")


def _use_wal(connection: sqlite3.Connection) -> None:
    """Switch to WAL; the switch skips the busy handler, so retry it by hand
    while another process opening the same new file holds it."""
    for attempt in range(200):
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 199:
                raise
            time.sleep(0.05)


class _AutoBegin:
    """sqlite3 in autocommit mode, with rollback/commit safe outside a txn."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, statement: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._connection.execute(statement, params)

    def cursor(self) -> sqlite3.Cursor:
        return self._connection.cursor()

    def commit(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("COMMIT")

    def rollback(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("ROLLBACK")

    def close(self) -> None:
        self._connection.close()


class PostgresDatabase(Database):
    dialect = "postgresql"
    blob_type = "BYTEA"

    def connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.url, autocommit=False)
        except psycopg.OperationalError as exc:
            raise StorageError(
                f"cannot connect to PostgreSQL at {_redact(self.url)}: {exc}"
            ) from None

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def _relax(self, connection: Any) -> None:
        # This opens the transaction; LOCAL ends with it, so nothing needs
        # restoring.
        connection.execute("SET LOCAL synchronous_commit TO OFF")


def open_database(url: str) -> Database:
    """The database a catalog URL names: sqlite:///path or postgresql://..."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        path = sqlite_path(url)
        if path is None:
            raise ConfigError(f"catalog URL {url!r} names no file; use sqlite:///PATH")
        return SQLiteDatabase(url, path)
    if scheme in ("postgresql", "postgres"):
        return PostgresDatabase(url)
    raise ConfigError(
        f"catalog URL {url!r} is neither sqlite:///PATH nor postgresql://..."
    )


def sqlite_path(url: str) -> Path | None:
    """The file of sqlite:///relative or sqlite:////absolute; None if not SQLite."""
    if not url.startswith("sqlite:///") or url in ("sqlite:///", "sqlite:////"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url
