"""The catalog: every file's state, its staged chunks, and stored text.

It is the workers' only shared memory. A packet is acked once its chunk is
recorded here (and, when large, written to the staging store), so any
worker can pick up any file where another left it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

from datahaul.protocol.packet import Packet
from datahaul.storage.digests import Digests, integrity_error
from datahaul.storage.sql import Database, Transaction, open_database

log = structlog.get_logger("datahaul.catalog")

# Any constant will do, as long as nothing else in the database uses it.
MIGRATION_LOCK = 0x64617461686C

TEXT_LOCATION = "catalog:texts/"

RECEIVING = "receiving"
ASSEMBLING = "assembling"
STORED = "stored"
FAILED = "failed"
EXPIRED = "expired"

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE files (
            file_id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            total_seq INTEGER NOT NULL,
            received INTEGER NOT NULL DEFAULT 0,
            received_bytes BIGINT NOT NULL DEFAULT 0,
            state TEXT NOT NULL,
            file_name TEXT,
            content_type TEXT,
            device_id TEXT,
            expected_sha256 TEXT,
            metadata TEXT,
            size BIGINT,
            sha256 TEXT,
            location TEXT,
            error TEXT,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            event_sent INTEGER NOT NULL DEFAULT 0,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            stored_at DOUBLE PRECISION
        );
        CREATE INDEX files_state ON files (state, updated_at);
        CREATE INDEX files_device ON files (device_id, created_at);
        CREATE TABLE chunks (
            file_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            size INTEGER NOT NULL,
            staged_name TEXT,
            inline_data {blob},
            PRIMARY KEY (file_id, seq)
        );
        CREATE TABLE texts (
            file_id TEXT PRIMARY KEY,
            content {blob} NOT NULL,
            file_name TEXT,
            content_type TEXT,
            device_id TEXT,
            metadata TEXT,
            sha256 TEXT NOT NULL,
            stored_at DOUBLE PRECISION NOT NULL
        );
        """,
    ),
    (
        2,
        # An expired file's staged objects are removed one by one, not by
        # folder, and a chunk staged into one of them is refused: a worker
        # may still write into a file's old image when the file starts over.
        """
        ALTER TABLE files ADD COLUMN expiries INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE discarded_objects (
            file_id TEXT NOT NULL,
            staged_object TEXT NOT NULL,
            discarded_at DOUBLE PRECISION NOT NULL,
            removed_at DOUBLE PRECISION,
            PRIMARY KEY (file_id, staged_object)
        );
        """,
    ),
    (
        3,
        # The whole file's XXH128, the check `datahaul send` names by
        # default since 2026-12-04 (docs/protocol.md).
        """
        ALTER TABLE files ADD COLUMN expected_xxh128 TEXT;
        """,
    ),
]


@dataclass
class FileRecord:
    file_id: str
    type: str
    total_seq: int
    received: int
    received_bytes: int
    state: str
    file_name: str | None
    content_type: str | None
    device_id: str | None
    expected_sha256: str | None
    metadata: dict[str, Any] | None
    size: int | None
    sha256: str | None
    location: str | None
    error: str | None
    created_at: float
    updated_at: float
    stored_at: float | None
    expected_xxh128: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


FILE_COLUMNS = ", ".join(FileRecord.__dataclass_fields__)


@dataclass
class StagedChunk:
    seq: int
    size: int
    staged_name: str | None
    inline_data: bytes | None


@dataclass
class StageOutcome:
    """What happened to one packet in a staging transaction."""

    packet: Packet
    # "staged", "duplicate", "conflict", or "stale": staged into an object
    # that the file's expiry discarded, so its bytes may be gone.
    status: str
    reason: str = ""


@dataclass
class StageResult:
    """What one staging transaction did."""

    outcomes: list[StageOutcome] = field(default_factory=list)
    complete: set[str] = field(default_factory=set)
    finished: list[FileRecord] = field(default_factory=list)


STALE_REASON = "staged into an object that the file's expiry discarded"


class Expected(NamedTuple):
    """The whole-file digests a file's packets have named so far."""

    xxh128: str | None = None
    sha256: str | None = None


def staged_object(staged_name: str) -> str:
    """The staging object a chunk's name points into ('segment@offset')."""
    return staged_name.partition("@")[0]


class Catalog:
    def __init__(self, database: Database) -> None:
        self.db = database

    @classmethod
    def open(cls, url: str) -> Catalog:
        catalog = cls(open_database(url))
        catalog.migrate()
        return catalog

    def migrate(self) -> list[int]:
        """Apply the migrations this database has not seen; return them."""
        with self.db.transaction() as txn:
            if self.db.dialect == "postgresql":
                # Processes starting together on an empty database must not
                # race to create the same tables.
                txn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            txn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {
                row[0]
                for row in txn.execute(
                    "SELECT version FROM schema_migrations"
                ).fetchall()
            }
            applied = []
            for version, script in MIGRATIONS:
                if version in done:
                    continue
                for statement in script.format(blob=self.db.blob_type).split(";"):
                    if statement.strip():
                        txn.execute(statement)
                txn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
                applied.append(version)
        if applied:
            log.info("catalog.migrated", versions=applied, dialect=self.db.dialect)
        return applied

    def stage(
        self,
        staged: Sequence[tuple[Packet, str | None]],
        inline_limit: int,
        finish_text_up_to: int = 0,
    ) -> StageResult:
        """Record chunks in one transaction; say what each packet did.

        Each item is a packet and the name its payload was staged under in
        the staging store (None when it is small enough to keep inline).
        Text files that complete here, all inline and no larger than
        `finish_text_up_to`, are stored in the same transaction: no lease,
        no second commit, which is what makes small files cheap and fast.
        """
        result = StageResult()
        now = time.time()
        by_file: dict[str, list[int]] = {}
        for index, (packet, _) in enumerate(staged):
            by_file.setdefault(packet.file_id, []).append(index)
        outcomes: list[StageOutcome | None] = [None] * len(staged)
        with self.db.transaction() as txn:
            # Rows are locked in (file_id, seq) order, the same in every
            # worker, so two workers staging the same files cannot deadlock.
            for file_id in sorted(by_file):
                indexes = sorted(by_file[file_id], key=lambda i: staged[i][0].seq)
                group = [staged[i] for i in indexes]
                whole = self._store_whole_text(txn, group, finish_text_up_to, now)
                if whole is not None:
                    done, stored = whole
                    result.finished.append(stored)
                else:
                    done, complete = self._stage_file(txn, group, inline_limit, now)
                    if complete:
                        result.complete.add(file_id)
                for index, outcome in zip(indexes, done, strict=True):
                    outcomes[index] = outcome
            for file_id in sorted(result.complete):
                record = self._finish_small_text(txn, file_id, finish_text_up_to, now)
                if record is not None:
                    result.finished.append(record)
                    result.complete.discard(file_id)
        result.outcomes = [outcome for outcome in outcomes if outcome is not None]
        return result

    def _store_whole_text(
        self,
        txn: Transaction,
        packets: Sequence[tuple[Packet, str | None]],
        limit: int,
        now: float,
    ) -> tuple[list[StageOutcome], FileRecord] | None:
        """Store a small text file whose every packet is in this batch, with no
        chunk rows; None when the file needs the usual path.

        Only a file the catalog has never seen qualifies: the stored file's
        row, inserted here, is what any other worker holding one of its
        packets then finds, exactly as if the chunks had been staged first.
        """
        first = packets[0][0]
        if first.type != "text":
            return None
        shape = _shape(first)
        by_seq: dict[int, Packet] = {}
        for packet, staged_name in packets:
            if staged_name is not None or _shape(packet) != shape:
                return None
            by_seq.setdefault(packet.seq, packet)
        if len(by_seq) != first.total_seq:
            return None
        content = b"".join(by_seq[seq].data for seq in range(1, first.total_seq + 1))
        if len(content) > limit:
            return None

        record = self._new_stored_text(first, content, now)
        inserted = txn.execute(
            f"INSERT INTO files ({FILE_COLUMNS}) VALUES "
            f"({', '.join('?' * len(FileRecord.__dataclass_fields__))}) "
            "ON CONFLICT (file_id) DO NOTHING",
            _row(record),
        ).rowcount
        if inserted != 1:
            return None
        if not record.error:
            self._store_text(txn, record, content, record.sha256 or "", now)

        outcomes = []
        for packet, _ in packets:
            if by_seq.pop(packet.seq, None) is packet:
                outcomes.append(StageOutcome(packet, "staged"))
            else:
                outcomes.append(
                    StageOutcome(packet, "duplicate", "chunk already staged")
                )
        return outcomes, record

    @staticmethod
    def _new_stored_text(first: Packet, content: bytes, now: float) -> FileRecord:
        record = FileRecord(
            file_id=first.file_id,
            type=first.type,
            total_seq=first.total_seq,
            received=first.total_seq,
            received_bytes=len(content),
            state=RECEIVING,
            file_name=first.file_name,
            content_type=first.content_type,
            device_id=first.device_id,
            expected_sha256=first.file_sha256,
            expected_xxh128=first.file_xxh128,
            metadata=first.metadata,
            size=None,
            sha256=None,
            location=None,
            error=None,
            created_at=now,
            updated_at=now,
            stored_at=None,
        )
        _judge_text(record, content, now)
        return record

    def _finish_small_text(
        self, txn: Transaction, file_id: str, limit: int, now: float
    ) -> FileRecord | None:
        row = txn.execute(
            f"SELECT {FILE_COLUMNS} FROM files WHERE file_id = ?", (file_id,)
        ).fetchone()
        assert row is not None
        record = _record(row)
        if record.type != "text" or record.received_bytes > limit:
            return None
        chunks = txn.execute(
            "SELECT inline_data, staged_name FROM chunks WHERE file_id = ? "
            "ORDER BY seq",
            (file_id,),
        ).fetchall()
        if any(name is not None for _, name in chunks):
            return None

        content = b"".join(bytes(data) for data, _ in chunks)
        _judge_text(record, content, now)
        txn.execute(
            "UPDATE files SET state = ?, size = ?, sha256 = ?, location = ?, "
            "error = ?, stored_at = ?, updated_at = ? WHERE file_id = ?",
            (
                record.state,
                record.size,
                record.sha256,
                record.location,
                record.error,
                record.stored_at,
                now,
                file_id,
            ),
        )
        if not record.error:
            self._store_text(txn, record, content, record.sha256 or "", now)
        txn.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
        return record

    def _stage_file(
        self,
        txn: Transaction,
        packets: Sequence[tuple[Packet, str | None]],
        inline_limit: int,
        now: float,
    ) -> tuple[list[StageOutcome], bool]:
        """Stage one file's packets of a batch; say whether the file is complete.

        The file row is read once and updated once per batch, not per packet.
        """
        file_id = packets[0][0].file_id
        kind, total_seq, state, expiries, expected = self._file_row_for(
            txn, packets[0][0], now
        )
        expected = self._note_expected(txn, packets, expected)
        discarded: set[str] = set()
        if expiries and any(name is not None for _, name in packets):
            rows = txn.execute(
                "SELECT staged_object FROM discarded_objects WHERE file_id = ?",
                (file_id,),
            ).fetchall()
            discarded = {row[0] for row in rows}
        outcomes: list[StageOutcome] = []
        added, added_bytes = 0, 0
        for packet, staged_name in packets:
            if staged_name is not None and staged_object(staged_name) in discarded:
                outcomes.append(StageOutcome(packet, "stale", STALE_REASON))
                continue
            outcome = self._stage_chunk(
                txn,
                packet,
                staged_name,
                (kind, total_seq, state, expected),
                inline_limit,
            )
            outcomes.append(outcome)
            if outcome.status == "staged":
                added += 1
                added_bytes += len(packet.data)
        if not added:
            return outcomes, False

        received = txn.execute(
            "UPDATE files SET received = received + ?, "
            "received_bytes = received_bytes + ?, updated_at = ? "
            "WHERE file_id = ? RETURNING received",
            (added, added_bytes, now, file_id),
        ).fetchone()
        assert received is not None
        return outcomes, received[0] == total_seq

    def _stage_chunk(
        self,
        txn: Transaction,
        packet: Packet,
        staged_name: str | None,
        shape: tuple[str, int, str, Expected],
        inline_limit: int,
    ) -> StageOutcome:
        kind, total_seq, state, expected = shape
        if kind != packet.type:
            return StageOutcome(
                packet,
                "conflict",
                f"type {packet.type!r} differs from the file's {kind!r}",
            )
        if total_seq != packet.total_seq:
            return StageOutcome(
                packet,
                "conflict",
                f"total_seq {packet.total_seq} differs from the file's {total_seq}",
            )
        for name, named, known in (
            ("file_xxh128", packet.file_xxh128, expected.xxh128),
            ("file_sha256", packet.file_sha256, expected.sha256),
        ):
            if named is not None and named != known:
                return StageOutcome(
                    packet,
                    "conflict",
                    f"{name} {named} differs from the file's {known}",
                )
        if state != RECEIVING:
            return StageOutcome(packet, "duplicate", f"file is {state}")

        inline = packet.data if staged_name is None else None
        if inline is not None and len(inline) > inline_limit:
            raise ValueError("a large chunk must be staged, not kept inline")
        inserted = txn.execute(
            "INSERT INTO chunks (file_id, seq, size, staged_name, inline_data) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (file_id, seq) DO NOTHING",
            (packet.file_id, packet.seq, len(packet.data), staged_name, inline),
        ).rowcount
        if inserted != 1:
            return StageOutcome(packet, "duplicate", "chunk already staged")
        return StageOutcome(packet, "staged")

    def _note_expected(
        self,
        txn: Transaction,
        packets: Sequence[tuple[Packet, str | None]],
        known: Expected,
    ) -> Expected:
        """Note the digests the file must have once assembled, each from the
        first packet that names it: a sender may name a digest only on its
        later packets, having worked it out while the first ones left."""
        xxh128 = known.xxh128 or next(
            (p.file_xxh128 for p, _ in packets if p.file_xxh128), None
        )
        sha256 = known.sha256 or next(
            (p.file_sha256 for p, _ in packets if p.file_sha256), None
        )
        noted = Expected(xxh128, sha256)
        if noted != known:
            txn.execute(
                "UPDATE files SET expected_xxh128 = ?, expected_sha256 = ? "
                "WHERE file_id = ?",
                (xxh128, sha256, packets[0][0].file_id),
            )
        return noted

    def _file_row_for(
        self, txn: Transaction, packet: Packet, now: float
    ) -> tuple[str, int, str, int, Expected]:
        """The file's type, total_seq, state, expiries and expected digests,
        its row locked.

        The lock is what keeps a staging transaction from judging its chunks
        by a state that a concurrent expiry is changing.
        """
        txn.execute(
            "INSERT INTO files (file_id, type, total_seq, state, file_name, "
            "content_type, device_id, expected_sha256, expected_xxh128, metadata, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (file_id) DO NOTHING",
            (
                packet.file_id,
                packet.type,
                packet.total_seq,
                RECEIVING,
                packet.file_name,
                packet.content_type,
                packet.device_id,
                packet.file_sha256,
                packet.file_xxh128,
                json.dumps(packet.metadata) if packet.metadata is not None else None,
                now,
                now,
            ),
        )
        # SQLite's writers take the whole database (BEGIN IMMEDIATE).
        lock = " FOR UPDATE" if self.db.dialect == "postgresql" else ""
        row = txn.execute(
            "SELECT type, total_seq, state, expiries, expected_xxh128, "
            "expected_sha256 FROM files WHERE file_id = ?" + lock,
            (packet.file_id,),
        ).fetchone()
        assert row is not None
        if row[2] == EXPIRED:
            # A packet for an expired file starts it over (docs/reliability.md).
            txn.execute(
                "UPDATE files SET state = ?, type = ?, total_seq = ?, received = 0, "
                "received_bytes = 0, error = NULL, expected_sha256 = NULL, "
                "expected_xxh128 = NULL, "
                "updated_at = ? WHERE file_id = ?",
                (RECEIVING, packet.type, packet.total_seq, now, packet.file_id),
            )
            return packet.type, packet.total_seq, RECEIVING, row[3], Expected()
        return row[0], row[1], row[2], row[3], Expected(row[4], row[5])

    def claim(self, file_id: str, owner: str, lease_seconds: float) -> bool:
        """Take the right to finalize a complete file; only one worker wins."""
        now = time.time()
        with self.db.transaction() as txn:
            claimed = txn.execute(
                "UPDATE files SET state = ?, lease_owner = ?, lease_until = ?, "
                "updated_at = ? WHERE file_id = ? AND received = total_seq AND "
                "(state = ? OR (state = ? AND lease_until < ?))",
                (
                    ASSEMBLING,
                    owner,
                    now + lease_seconds,
                    now,
                    file_id,
                    RECEIVING,
                    ASSEMBLING,
                    now,
                ),
            ).rowcount
        return claimed == 1

    def renew(self, file_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend a finalizer's lease; False when another worker took it over."""
        with self.db.transaction() as txn:
            renewed = txn.execute(
                "UPDATE files SET lease_until = ? WHERE file_id = ? AND "
                "lease_owner = ? AND state = ?",
                (time.time() + lease_seconds, file_id, owner, ASSEMBLING),
            ).rowcount
        return renewed == 1

    def chunks(self, file_id: str, page: int = 64) -> Iterator[StagedChunk]:
        """The file's chunks in seq order, a page at a time (bounded memory)."""
        after = 0
        while True:
            rows = self.db.query(
                "SELECT seq, size, staged_name, inline_data FROM chunks "
                "WHERE file_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (file_id, after, page),
            )
            for seq, size, name, inline in rows:
                data = bytes(inline) if inline is not None else None
                yield StagedChunk(seq, size, name, data)
            if len(rows) < page:
                return
            after = rows[-1][0]

    def finish(
        self,
        record: FileRecord,
        owner: str,
        *,
        state: str,
        size: int | None = None,
        sha256: str | None = None,
        location: str | None = None,
        error: str | None = None,
        text: bytes | None = None,
    ) -> bool:
        """Record the end of a file and drop its chunk rows, in one transaction.

        Returns False when the lease was lost: another worker finalizes it.
        """
        now = time.time()
        with self.db.transaction() as txn:
            updated = txn.execute(
                "UPDATE files SET state = ?, size = ?, sha256 = ?, location = ?, "
                "error = ?, stored_at = ?, updated_at = ?, lease_owner = NULL, "
                "lease_until = NULL WHERE file_id = ? AND lease_owner = ? "
                "AND state = ?",
                (
                    state,
                    size,
                    sha256,
                    location,
                    error,
                    now if state == STORED else None,
                    now,
                    record.file_id,
                    owner,
                    ASSEMBLING,
                ),
            ).rowcount
            if updated != 1:
                return False
            if text is not None:
                self._store_text(txn, record, text, sha256 or "", now)
            txn.execute("DELETE FROM chunks WHERE file_id = ?", (record.file_id,))
            # The finalizer deletes the file's whole staging folder next, and
            # a finished file is never staged into again.
            txn.execute(
                "DELETE FROM discarded_objects WHERE file_id = ?", (record.file_id,)
            )
        return True

    def _store_text(
        self,
        txn: Transaction,
        record: FileRecord,
        text: bytes,
        sha256: str,
        now: float,
    ) -> None:
        metadata = json.dumps(record.metadata) if record.metadata is not None else None
        txn.execute(
            "INSERT INTO texts (file_id, content, file_name, content_type, "
            "device_id, metadata, sha256, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (file_id) DO UPDATE SET content = excluded.content, "
            "sha256 = excluded.sha256, stored_at = excluded.stored_at",
            (
                record.file_id,
                text,
                record.file_name,
                record.content_type,
                record.device_id,
                metadata,
                sha256,
                now,
            ),
        )

    def mark_events_sent(self, file_ids: Sequence[str]) -> None:
        # Losing this note only sends the events again, which consumers of
        # at-least-once events already absorb; so it does not wait for the disk.
        with self.db.transaction(durable=False) as txn:
            txn.executemany(
                "UPDATE files SET event_sent = 1 WHERE file_id = ?",
                [(file_id,) for file_id in file_ids],
            )

    def get(self, file_id: str) -> FileRecord | None:
        rows = self.db.query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE file_id = ?", (file_id,)
        )
        return _record(rows[0]) if rows else None

    def list_files(
        self,
        *,
        type: str | None = None,
        state: str | None = None,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[FileRecord]:
        where, params = _filters(
            type=type, state=state, device_id=device_id, since=since, until=until
        )
        rows = self.db.query(
            f"SELECT {FILE_COLUMNS} FROM files {where} "
            "ORDER BY created_at DESC, file_id LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [_record(row) for row in rows]

    def received_seqs(self, file_id: str) -> list[int]:
        rows = self.db.query(
            "SELECT seq FROM chunks WHERE file_id = ? ORDER BY seq", (file_id,)
        )
        return [row[0] for row in rows]

    def text(self, file_id: str) -> bytes | None:
        rows = self.db.query("SELECT content FROM texts WHERE file_id = ?", (file_id,))
        return bytes(rows[0][0]) if rows else None

    def due_for_finalize(self, now: float) -> list[str]:
        """Complete files nobody is finalizing: a claim lost to a crash."""
        rows = self.db.query(
            "SELECT file_id FROM files WHERE received = total_seq AND "
            "(state = ? OR (state = ? AND lease_until < ?))",
            (RECEIVING, ASSEMBLING, now),
        )
        return [row[0] for row in rows]

    def events_unsent(self, older_than: float) -> list[FileRecord]:
        rows = self.db.query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE state IN (?, ?) AND "
            "event_sent = 0 AND updated_at < ?",
            (STORED, FAILED, older_than),
        )
        return [_record(row) for row in rows]

    def stale_files(self, older_than: float) -> list[str]:
        """Files idle in receiving since before `older_than`."""
        rows = self.db.query(
            "SELECT file_id FROM files WHERE state = ? AND updated_at < ?",
            (RECEIVING, older_than),
        )
        return sorted(row[0] for row in rows)

    def expire(
        self, older_than: float, listed: Mapping[str, Collection[str]] | None = None
    ) -> list[str]:
        """Mark files idle since before `older_than` expired; drop their chunks.

        `listed` holds the objects found in each stale file's staging folder
        (then only those files are considered). They, and the objects the
        chunks name, are recorded as discarded, for `objects_to_remove`: a
        packet may start the file over at any moment and stage beside them,
        so its folder is never deleted as a whole.
        """
        now = time.time()
        candidates = sorted(listed) if listed is not None else None
        if candidates is None:
            candidates = self.stale_files(older_than)
        expired = []
        with self.db.transaction() as txn:
            for file_id in candidates:
                found = listed.get(file_id, ()) if listed is not None else ()
                if self._expire_file(txn, file_id, older_than, found, now):
                    expired.append(file_id)
        return expired

    def _expire_file(
        self,
        txn: Transaction,
        file_id: str,
        older_than: float,
        listed: Collection[str],
        now: float,
    ) -> bool:
        # The condition is checked again under the row's lock: a packet
        # staged since the file was found stale keeps it alive.
        changed = txn.execute(
            "UPDATE files SET state = ?, error = ?, updated_at = ?, received = 0, "
            "received_bytes = 0, expiries = expiries + 1 WHERE file_id = ? AND "
            "state = ? AND updated_at < ?",
            (EXPIRED, "incomplete for too long", now, file_id, RECEIVING, older_than),
        ).rowcount
        if changed != 1:
            return False
        named = txn.execute(
            "SELECT DISTINCT staged_name FROM chunks WHERE file_id = ? "
            "AND staged_name IS NOT NULL",
            (file_id,),
        ).fetchall()
        objects = {staged_object(row[0]) for row in named} | set(listed)
        self._discard(txn, file_id, objects, now)
        txn.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
        return True

    def discard_leftovers(self, file_id: str, listed: Collection[str]) -> bool:
        """Discard objects found in an expired file's staging folder.

        They were staged after the file expired by a worker that died before
        recording them, or by one that found them stale. Nothing happens
        (False) if the file started over meanwhile: they may be its chunks.
        """
        now = time.time()
        with self.db.transaction() as txn:
            locked = txn.execute(
                "UPDATE files SET expiries = expiries WHERE file_id = ? AND state = ?",
                (file_id, EXPIRED),
            ).rowcount
            if locked != 1:
                return False
            self._discard(txn, file_id, listed, now)
        return True

    @staticmethod
    def _discard(
        txn: Transaction, file_id: str, objects: Collection[str], now: float
    ) -> None:
        # An object removed once may have been written again by a worker
        # still holding the file's old image: it is to be removed again.
        txn.executemany(
            "INSERT INTO discarded_objects (file_id, staged_object, discarded_at) "
            "VALUES (?, ?, ?) ON CONFLICT (file_id, staged_object) "
            "DO UPDATE SET removed_at = NULL",
            [(file_id, name, now) for name in sorted(objects)],
        )

    def objects_to_remove(self, limit: int = 1000) -> list[tuple[str, str]]:
        """Discarded staged objects not yet removed: (file_id, object name)."""
        rows = self.db.query(
            "SELECT file_id, staged_object FROM discarded_objects "
            "WHERE removed_at IS NULL ORDER BY file_id, staged_object LIMIT ?",
            (limit,),
        )
        return [(row[0], row[1]) for row in rows]

    def mark_removed(self, objects: Sequence[tuple[str, str]]) -> None:
        now = time.time()
        with self.db.transaction() as txn:
            txn.executemany(
                "UPDATE discarded_objects SET removed_at = ? "
                "WHERE file_id = ? AND staged_object = ?",
                [(now, file_id, name) for file_id, name in objects],
            )

    def states(self, file_ids: Sequence[str]) -> dict[str, str]:
        if not file_ids:
            return {}
        marks = ", ".join("?" for _ in file_ids)
        rows = self.db.query(
            f"SELECT file_id, state FROM files WHERE file_id IN ({marks})",
            tuple(file_ids),
        )
        return {row[0]: row[1] for row in rows}

    def close(self) -> None:
        self.db.close()


def _filters(**conditions: Any) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for name, value in conditions.items():
        if value is None:
            continue
        if name == "since":
            clauses.append("created_at >= ?")
        elif name == "until":
            clauses.append("created_at < ?")
        else:
            clauses.append(f"{name} = ?")
        params.append(value)
    where = "WHERE " + " AND ".join(clauses) if clauses else ""
    return where, params


def _judge_text(record: FileRecord, content: bytes, now: float) -> None:
    """What storing `content` as the record's text makes of the record:
    stored with its SHA-256, or failed when that differs from the expected."""
    digests = Digests.of(content)
    record.sha256 = digests.sha256
    record.size = len(content)
    record.error = integrity_error(
        digests, record.expected_sha256, record.expected_xxh128
    )
    record.state = FAILED if record.error else STORED
    record.location = None if record.error else TEXT_LOCATION + record.file_id
    record.stored_at = None if record.error else now
    record.updated_at = now


def _shape(packet: Packet) -> tuple[str, int, str | None, str | None]:
    """What every packet of a file must agree on."""
    return (packet.type, packet.total_seq, packet.file_xxh128, packet.file_sha256)


def _row(record: FileRecord) -> tuple[Any, ...]:
    """A record as the values of FILE_COLUMNS, metadata as the JSON stored."""
    values = record.to_json()
    if values["metadata"] is not None:
        values["metadata"] = json.dumps(values["metadata"])
    return tuple(values.values())


def _record(row: Sequence[Any]) -> FileRecord:
    record = FileRecord(*row)
    if isinstance(record.metadata, str):
        record.metadata = json.loads(record.metadata)
    return record


def missing_ranges(received: Sequence[int], total: int) -> list[list[int]]:
    """The [first, last] runs of seqs in 1..total that are not in `received`."""
    ranges: list[list[int]] = []
    expected = 1
    for seq in received:
        if seq > expected:
            ranges.append([expected, seq - 1])
        expected = max(expected, seq + 1)
    if expected <= total:
        ranges.append([expected, total])
    return ranges
