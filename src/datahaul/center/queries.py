"""Read-only catalog questions the dashboard asks every second.

Each query is shaped to use the catalog's (state, updated_at) index, so a
poll stays cheap however many files the catalog holds. The functions block:
the app runs them on its catalog thread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from datahaul.storage.catalog import (
    ASSEMBLING,
    FAILED,
    RECEIVING,
    STORED,
    Catalog,
)

THROUGHPUT_WINDOW = 60
SUMMARY_COLUMNS = (
    "file_id, type, state, file_name, device_id, total_seq, received, "
    "received_bytes, size, sha256, error, created_at, updated_at, stored_at"
)
SUMMARY_FIELDS = [name.strip() for name in SUMMARY_COLUMNS.split(",")]
# A minute of stored files is bucketed in Python; past this many rows the
# figure is an undercount, which a dashboard can live with.
THROUGHPUT_ROWS = 20_000


def in_flight(catalog: Catalog, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The most recently active unfinished files, and how many there are."""
    files: list[dict[str, Any]] = []
    count = 0
    for state in (ASSEMBLING, RECEIVING):
        files += _latest(catalog, state, limit)
        count += _count(catalog, state)
    files.sort(key=lambda f: f["updated_at"], reverse=True)
    return files[:limit], count


def recent(catalog: Catalog, limit: int) -> list[dict[str, Any]]:
    """The files most recently finished, stored or failed, newest first."""
    files = _latest(catalog, STORED, limit) + _latest(catalog, FAILED, limit)
    files.sort(key=lambda f: f["updated_at"], reverse=True)
    return files[:limit]


def throughput(catalog: Catalog, now: float | None = None) -> dict[str, Any]:
    """Bytes stored per second over the last minute, and per second within it."""
    now = time.time() if now is None else now
    start = now - THROUGHPUT_WINDOW
    # finish() sets updated_at with stored_at, so the index finds the minute.
    rows = catalog.db.query(
        "SELECT stored_at, size FROM files WHERE state = ? AND updated_at >= ? LIMIT ?",
        (STORED, start, THROUGHPUT_ROWS),
    )
    series = [0] * THROUGHPUT_WINDOW
    total = 0
    files = 0
    for stored_at, size in rows:
        if stored_at is None or stored_at < start or stored_at > now:
            continue
        index = min(THROUGHPUT_WINDOW - 1, int(stored_at - start))
        series[index] += size or 0
        total += size or 0
        files += 1
    return {
        "window_seconds": THROUGHPUT_WINDOW,
        "bytes_per_second": total / THROUGHPUT_WINDOW,
        "bytes": total,
        "files": files,
        "series": series,
    }


def state_counts(catalog: Catalog) -> dict[str, int]:
    rows = catalog.db.query("SELECT state, COUNT(*) FROM files GROUP BY state")
    return {state: int(count) for state, count in rows}


def oldest_receiving_idle(catalog: Catalog, now: float | None = None) -> float:
    """Seconds since the least recently active receiving file last moved (0: none)."""
    now = time.time() if now is None else now
    rows = catalog.db.query(
        "SELECT MIN(updated_at) FROM files WHERE state = ?", (RECEIVING,)
    )
    oldest = rows[0][0] if rows else None
    return max(0.0, now - oldest) if oldest is not None else 0.0


def _latest(catalog: Catalog, state: str, limit: int) -> list[dict[str, Any]]:
    rows = catalog.db.query(
        f"SELECT {SUMMARY_COLUMNS} FROM files WHERE state = ? "
        "ORDER BY updated_at DESC LIMIT ?",
        (state, limit),
    )
    return [_summary(row) for row in rows]


def _count(catalog: Catalog, state: str) -> int:
    rows = catalog.db.query("SELECT COUNT(*) FROM files WHERE state = ?", (state,))
    return int(rows[0][0]) if rows else 0


def _summary(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(SUMMARY_FIELDS, row, strict=True))
