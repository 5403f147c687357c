"""The gateway's ledger: which packets of recent files it has accepted.

It answers a sender resuming an interrupted file, and it is how the gateway
notices a packet whose type or total_seq contradicts its file. Losing the
last moments of it costs only re-sent packets, which the workers absorb,
so it commits with synchronous=NORMAL.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datahaul.errors import PacketConflict
from datahaul.gateway.local_db import GroupCommit, LocalDatabase
from datahaul.protocol.packet import Packet
from datahaul.storage.catalog import missing_ranges

# Notes nobody waits for: a status question flushes them first.
NOTE_GATHERING_SECONDS = 0.005

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_files (
    file_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    total_seq INTEGER NOT NULL,
    file_name TEXT,
    device_id TEXT,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_packets (
    file_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (file_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_files_seen ON ledger_files (last_seen);
"""


@dataclass(frozen=True)
class FileShape:
    type: str
    total_seq: int


class Ledger:
    def __init__(self, path: Path, remembered_files: int) -> None:
        self.db = LocalDatabase(path, SCHEMA, synchronous="NORMAL")
        self._shapes: OrderedDict[str, FileShape] = OrderedDict()
        self._remembered = remembered_files
        self._writes: GroupCommit[Packet] = GroupCommit(
            self.db, _record, put_gathers_for=NOTE_GATHERING_SECONDS
        )

    def check(self, packets: Sequence[Packet]) -> None:
        """Raise PacketConflict for a packet that contradicts its file.

        It never awaits: a new file's shape is remembered at once, so two
        concurrent requests for it cannot both set a different shape.
        """
        unknown = {p.file_id for p in packets if p.file_id not in self._shapes}
        if unknown:
            known = self.db.read_here(lambda db: _load_shapes(db, unknown))
            for file_id, known_shape in known.items():
                self._shapes.setdefault(file_id, known_shape)

        for index, packet in enumerate(packets):
            shape = self._shapes.get(packet.file_id)
            if shape is None:
                self._remember(packet.file_id, FileShape(packet.type, packet.total_seq))
                continue
            self._shapes.move_to_end(packet.file_id)
            if shape.type != packet.type:
                raise PacketConflict(
                    "type",
                    f"file {packet.file_id} was sent as {shape.type}, "
                    f"this packet says {packet.type}",
                    index=index if len(packets) > 1 else None,
                )
            if shape.total_seq != packet.total_seq:
                raise PacketConflict(
                    "total_seq",
                    f"file {packet.file_id} has total_seq {shape.total_seq}, "
                    f"this packet says {packet.total_seq}",
                    index=index if len(packets) > 1 else None,
                )

    def _remember(self, file_id: str, shape: FileShape) -> None:
        self._shapes[file_id] = shape
        while len(self._shapes) > self._remembered:
            self._shapes.popitem(last=False)

    def record(self, packets: Sequence[Packet]) -> None:
        """Note accepted packets in the next commit; the answer to the client
        does not wait for it, as a lost note only costs a re-sent packet."""
        self._writes.put(*packets)

    async def status(self, file_id: str) -> dict[str, Any] | None:
        await self._writes.flush()
        return await self.db.run(lambda db: _status(db, file_id))

    async def statuses(
        self, file_ids: Sequence[str]
    ) -> dict[str, dict[str, Any] | None]:
        """`status` of each file, in one trip to the database thread."""
        await self._writes.flush()
        return await self.db.run(
            lambda db: {file_id: _status(db, file_id) for file_id in file_ids}
        )

    async def forget_older_than(self, seconds: float) -> int:
        cutoff = time.time() - seconds
        return await self.db.run(lambda db: _forget(db, cutoff))

    async def close(self) -> None:
        await self._writes.flush()
        self.db.close()


def _load_shapes(db: sqlite3.Connection, file_ids: set[str]) -> dict[str, FileShape]:
    marks = ", ".join("?" for _ in file_ids)
    rows = db.execute(
        f"SELECT file_id, type, total_seq FROM ledger_files WHERE file_id IN ({marks})",
        tuple(file_ids),
    ).fetchall()
    return {row[0]: FileShape(row[1], row[2]) for row in rows}


def _record(db: sqlite3.Connection, packets: list[Packet]) -> None:
    now = time.time()
    db.executemany(
        "INSERT INTO ledger_files (file_id, type, total_seq, file_name, device_id, "
        "first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (file_id) DO UPDATE SET last_seen = excluded.last_seen",
        [
            (p.file_id, p.type, p.total_seq, p.file_name, p.device_id, now, now)
            for p in {p.file_id: p for p in packets}.values()
        ],
    )
    db.executemany(
        "INSERT OR IGNORE INTO ledger_packets (file_id, seq) VALUES (?, ?)",
        [(p.file_id, p.seq) for p in packets],
    )


def _status(db: sqlite3.Connection, file_id: str) -> dict[str, Any] | None:
    row = db.execute(
        "SELECT type, total_seq, file_name, device_id, first_seen, last_seen "
        "FROM ledger_files WHERE file_id = ?",
        (file_id,),
    ).fetchone()
    if row is None:
        return None
    seqs = [
        r[0]
        for r in db.execute(
            "SELECT seq FROM ledger_packets WHERE file_id = ? ORDER BY seq", (file_id,)
        )
    ]
    kind, total, file_name, device_id, first_seen, last_seen = row
    return {
        "file_id": file_id,
        "type": kind,
        "total_seq": total,
        "received": len(seqs),
        "missing": missing_ranges(seqs, total),
        "complete": len(seqs) == total,
        "file_name": file_name,
        "device_id": device_id,
        "first_seen": first_seen,
        "last_seen": last_seen,
    }


def _forget(db: sqlite3.Connection, cutoff: float) -> int:
    old = [
        r[0]
        for r in db.execute(
            "SELECT file_id FROM ledger_files WHERE last_seen < ?", (cutoff,)
        )
    ]
    db.executemany("DELETE FROM ledger_packets WHERE file_id = ?", [(f,) for f in old])
    db.executemany("DELETE FROM ledger_files WHERE file_id = ?", [(f,) for f in old])
    return len(old)
