"""Store-and-forward: messages RabbitMQ could not take wait here, on disk.

A row is written with synchronous=FULL before the client hears 2xx, and it
is marked forwarded only after RabbitMQ confirmed the message that replaces
it, so a packet the gateway accepted survives a broker outage, a lost
confirm and a `kill -9` of the gateway itself. Forwarded rows are deleted
after the drain: deleting a row walks its whole body's pages again, which
done inline halved the drain rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
CREATE TABLE IF NOT EXISTS forwarded (
    id INTEGER PRIMARY KEY,
    size INTEGER NOT NULL
);
"""

# A pass keeps up to this many batches read and unconfirmed: enough to cover
# the time a batch waits for its confirms, and bounded, since every body
# read stays in memory until its confirm.
DRAIN_BATCH_BYTES = 8 * 1024 * 1024
DRAIN_BATCH_ROWS = 256
DRAIN_BATCHES_IN_FLIGHT = 4
# Forwarded rows deleted per transaction, so that inserts of new packets
# wait for one short transaction at most, not for the whole clean-up.
PURGE_BATCH_ROWS = 64
NOT_FORWARDED = "NOT EXISTS (SELECT 1 FROM forwarded f WHERE f.id = outbox.id)"


@dataclass
class OutboxRow:
    row_id: int
    message: Outgoing
    size: int
    packets: int


class Outbox:
    def __init__(self, path: Path, quota_bytes: int) -> None:
        # Large pages: a 256 KiB body spans 4 pages instead of 64, which is
        # most of the cost of writing it and of reading it back to drain.
        self.db = LocalDatabase(path, SCHEMA, synchronous="FULL", page_size=65536)
        self.quota_bytes = quota_bytes
        self.packets, self.bytes = self.db.run_sync(_depth)
        # Bytes of forwarded rows not deleted yet: still on disk, so still
        # within the quota, but no longer waiting to be sent.
        self.forwarded_bytes = self.db.run_sync(_forwarded_bytes)
        self._reserved = 0
        self._writes: GroupCommit[Outgoing] = GroupCommit(self.db, _insert)
        self._wake = asyncio.Event()

    async def put(self, messages: Sequence[Outgoing]) -> None:
        """Keep messages durably; OutboxFull when the quota has no room left."""
        size = sum(_footprint(m) for m in messages)
        held = self.bytes + self.forwarded_bytes
        if held + self._reserved + size > self.quota_bytes:
            raise OutboxFull(
                f"the outbox holds {held} bytes of its {self.quota_bytes} byte "
                "quota; retry once the broker link is back and it drains"
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
            # Rows forwarded before a restart, or by a pass cut short.
            if self.forwarded_bytes:
                await self.purge_forwarded()
            if self.bytes == 0 or not publisher.link_up:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            try:
                await self._forward_pass(publisher)
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

    async def purge_forwarded(self) -> None:
        """Delete the rows already forwarded, a short transaction at a time."""
        while True:
            freed = await self.db.run(_delete_forwarded, durable=False)
            if freed is None:
                self.forwarded_bytes = 0
                return
            self.forwarded_bytes = max(0, self.forwarded_bytes - freed)

    async def _forward_pass(self, publisher: ConfirmingPublisher) -> None:
        """Publish every row, oldest first, in one pass over the table.

        The next batch is read while earlier ones wait for their confirms,
        so the broker always has work; a failed batch ends the pass, and
        its unconfirmed rows are sent again by the next one.
        """
        started = time.monotonic()
        after = 0
        forwarded = 0
        in_flight: set[asyncio.Task[int]] = set()
        try:
            while publisher.link_up:
                rows = await self.db.run(_reader(after))
                if not rows:
                    break
                after = rows[-1].row_id
                in_flight.add(asyncio.create_task(self._forward_batch(publisher, rows)))
                if len(in_flight) >= DRAIN_BATCHES_IN_FLIGHT:
                    done, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    forwarded += sum(task.result() for task in done)
        finally:
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)

        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            forwarded += outcome
        if forwarded == 0 and after == 0:
            # Nothing left to read, yet the counters say otherwise: trust
            # the table, or this loop would spin.
            self.packets, self.bytes = await self.db.run(_depth)
            return
        log.info(
            "outbox.forwarded",
            messages=forwarded,
            seconds=round(time.monotonic() - started, 3),
            left_packets=self.packets,
            left_bytes=self.bytes,
        )

    async def _forward_batch(
        self, publisher: ConfirmingPublisher, rows: list[OutboxRow]
    ) -> int:
        results = await asyncio.gather(
            *(publisher.publish(row.message) for row in rows),
            return_exceptions=True,
        )
        metrics.GATEWAY.record_forwarded([row.message for row in rows], results)
        confirmed = [
            row for row, result in zip(rows, results, strict=True) if result is None
        ]
        if confirmed:
            # A mark lost to a power cut only sends those rows once more,
            # and workers absorb duplicates: no need to wait for the disk.
            await self.db.run(lambda db: _mark_forwarded(db, confirmed), durable=False)
            self.packets -= sum(row.packets for row in confirmed)
            self.bytes -= sum(row.size for row in confirmed)
            self.forwarded_bytes += sum(row.size for row in confirmed)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise BrokerError(
                f"{len(failures)} of {len(rows)} forwards failed: {failures[0]}"
            )
        return len(confirmed)

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


def _reader(after: int) -> Callable[[sqlite3.Connection], list[OutboxRow]]:
    return lambda db: _oldest(db, after)


def _oldest(db: sqlite3.Connection, after: int) -> list[OutboxRow]:
    """The next rows after `after`, up to a batch's bytes.

    The cursor is read row by row: fetching a whole LIMIT of large bodies
    at once was what pushed the gateway past 200 MB while draining.
    """
    cursor = db.execute(
        "SELECT id, routing_key, content_type, message_id, headers, body, size, "
        f"packets FROM outbox WHERE id > ? AND {NOT_FORWARDED} ORDER BY id LIMIT ?",
        (after, DRAIN_BATCH_ROWS),
    )
    batch: list[OutboxRow] = []
    total = 0
    for (
        row_id,
        routing_key,
        content_type,
        message_id,
        extra,
        body,
        size,
        packets,
    ) in cursor:
        fields = msgspec.msgpack.decode(extra)
        keys = [tuple(key) for key in fields["keys"]]
        message = Outgoing(
            routing_key, body, fields["headers"], content_type, message_id, keys
        )
        batch.append(OutboxRow(row_id, message, size, packets))
        total += size
        if total >= DRAIN_BATCH_BYTES:
            break
    cursor.close()
    return batch


def _mark_forwarded(db: sqlite3.Connection, rows: list[OutboxRow]) -> None:
    # The size is kept beside the mark: reading it from the outbox row would
    # walk the body's pages, as it is stored after the body.
    db.executemany(
        "INSERT OR IGNORE INTO forwarded (id, size) VALUES (?, ?)",
        [(row.row_id, row.size) for row in rows],
    )


def _delete_forwarded(db: sqlite3.Connection) -> int | None:
    """Delete some forwarded rows; the bytes freed, or None when none are left."""
    marked = db.execute(
        "SELECT id, size FROM forwarded ORDER BY id LIMIT ?", (PURGE_BATCH_ROWS,)
    ).fetchall()
    if not marked:
        return None
    ids = [row_id for row_id, _ in marked]
    marks = ", ".join("?" * len(ids))
    db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids)
    db.execute(f"DELETE FROM forwarded WHERE id IN ({marks})", ids)
    return sum(int(size) for _, size in marked)


def _depth(db: sqlite3.Connection) -> tuple[int, int]:
    row = db.execute(
        "SELECT COALESCE(SUM(packets), 0), COALESCE(SUM(size), 0) FROM outbox "
        f"WHERE {NOT_FORWARDED}"
    ).fetchone()
    return int(row[0]), int(row[1])


def _forwarded_bytes(db: sqlite3.Connection) -> int:
    (held,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM forwarded").fetchone()
    return int(held)
