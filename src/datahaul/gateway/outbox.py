"""Store-and-forward: messages RabbitMQ could not take wait here, on disk.

A row is written with synchronous=FULL before the client hears 2xx, and it
is deleted only after RabbitMQ confirmed the message that replaces it, so a
packet the gateway accepted survives a broker outage, a lost confirm and a
`kill -9` of the gateway itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import structlog

from datahaul import metrics
from datahaul.broker.publisher import ConfirmingPublisher, Outgoing
from datahaul.errors import BrokerError, OutboxFull
from datahaul.gateway.local_db import GroupCommit, LocalDatabase

log = structlog.get_logger("datahaul.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    routing_key TEXT NOT NULL,
    content_type TEXT NOT NULL,
    message_id TEXT NOT NULL,
    headers BLOB NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    packets INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""

DRAIN_BATCH_BYTES = 32 * 1024 * 1024
DRAIN_BATCH_ROWS = 512


class Outbox:
    def __init__(self, path: Path, quota_bytes: int) -> None:
        self.db = LocalDatabase(path, SCHEMA, synchronous="FULL")
        self.quota_bytes = quota_bytes
        self.packets, self.bytes = self.db.run_sync(_depth)
        self._reserved = 0
        self._writes: GroupCommit[Outgoing] = GroupCommit(self.db, _insert)
        self._wake = asyncio.Event()

    async def put(self, messages: Sequence[Outgoing]) -> None:
        """Keep messages durably; OutboxFull when the quota has no room left."""
        size = sum(_footprint(m) for m in messages)
        if self.bytes + self._reserved + size > self.quota_bytes:
            raise OutboxFull(
                f"the outbox holds {self.bytes} bytes of its {self.quota_bytes} "
                "byte quota; retry once the broker link is back and it drains"
            )
        # Reserve before awaiting, so concurrent requests cannot overshoot.
        self._reserved += size
        try:
            await self._writes.submit(*messages)
        finally:
            self._reserved -= size
        self.packets += sum(_packets(m) for m in messages)
        self.bytes += size
        self._wake.set()

    async def forward_forever(self, publisher: ConfirmingPublisher) -> None:
        """Drain to RabbitMQ whenever the link is up; never gives up."""
        while True:
            if self.bytes == 0 or not publisher.link_up:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            try:
                await self._forward_batch(publisher)
            except BrokerError as exc:
                log.warning(
                    "outbox.forward_paused",
                    error=str(exc),
                    packets=self.packets,
                    bytes=self.bytes,
                )
                await publisher.wait_up(5.0)
                await asyncio.sleep(0.5)

    def wake(self) -> None:
        self._wake.set()

    async def _forward_batch(self, publisher: ConfirmingPublisher) -> None:
        rows = await self.db.run(_oldest)
        if not rows:
            self.packets, self.bytes = await self.db.run(_depth)
            return
        started = time.monotonic()
        results = await asyncio.gather(
            *(publisher.publish(message) for _, message in rows),
            return_exceptions=True,
        )
        metrics.GATEWAY.record_forwarded(rows, results)
        confirmed = [
            row_id
            for (row_id, _), result in zip(rows, results, strict=True)
            if result is None
        ]
        if confirmed:
            await self.db.run(lambda db: _delete(db, confirmed))
            self.packets, self.bytes = await self.db.run(_depth)
            log.info(
                "outbox.forwarded",
                messages=len(confirmed),
                seconds=round(time.monotonic() - started, 3),
                left_packets=self.packets,
                left_bytes=self.bytes,
            )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise BrokerError(
                f"{len(failures)} of {len(rows)} forwards failed: {failures[0]}"
            )

    def close(self) -> None:
        self.db.close()


def _footprint(message: Outgoing) -> int:
    return len(message.body) + 256


def _packets(message: Outgoing) -> int:
    return max(1, len(message.keys))


def _insert(db: sqlite3.Connection, messages: list[Outgoing]) -> None:
    now = time.time()
    db.executemany(
        "INSERT INTO outbox (routing_key, content_type, message_id, headers, body, "
        "size, packets, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                m.routing_key,
                m.content_type,
                m.message_id,
                msgspec.msgpack.encode({"headers": m.headers, "keys": m.keys}),
                m.body,
                _footprint(m),
                _packets(m),
                now,
            )
            for m in messages
        ],
    )


def _oldest(db: sqlite3.Connection) -> list[tuple[int, Outgoing]]:
    rows = db.execute(
        "SELECT id, routing_key, content_type, message_id, headers, body, size "
        "FROM outbox ORDER BY id LIMIT ?",
        (DRAIN_BATCH_ROWS,),
    ).fetchall()
    batch: list[tuple[int, Outgoing]] = []
    total = 0
    for row_id, routing_key, content_type, message_id, extra, body, size in rows:
        if batch and total + size > DRAIN_BATCH_BYTES:
            break
        total += size
        fields = msgspec.msgpack.decode(extra)
        keys = [tuple(key) for key in fields["keys"]]
        batch.append(
            (
                row_id,
                Outgoing(
                    routing_key, body, fields["headers"], content_type, message_id, keys
                ),
            )
        )
    return batch


def _delete(db: sqlite3.Connection, row_ids: list[int]) -> None:
    db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in row_ids])


def _depth(db: sqlite3.Connection) -> tuple[int, int]:
    row = db.execute(
        "SELECT COALESCE(SUM(packets), 0), COALESCE(SUM(size), 0) FROM outbox"
    ).fetchone()
    return int(row[0]), int(row[1])
