"""Staging packets and putting whole files together: the workers' blocking core.

Both steps are written to be repeated safely: a packet staged twice is
recorded once, and a file finalized twice ends up stored once, because
every write lands under a name fixed by the file and the catalog decides
who wins.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

import structlog

from datahaul.config import Settings
from datahaul.errors import IntegrityError, StorageError
from datahaul.protocol.packet import Packet
from datahaul.storage.blobs import BlobStore
from datahaul.storage.catalog import (
    ASSEMBLING,
    EXPIRED,
    FAILED,
    RECEIVING,
    STORED,
    TEXT_LOCATION,
    Catalog,
    FileRecord,
    StagedChunk,
    StageOutcome,
    StageResult,
    integrity_error,
)

log = structlog.get_logger("datahaul.worker")

UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
# Below this, a thread hop costs more than the hashing it would overlap.
THREADED_HASH_BYTES = 64 * 1024


@dataclass
class Finalized:
    """The end of one file, as the worker that finished it saw it."""

    record: FileRecord
    state: str
    duration: float


class Assembler:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        staging: BlobStore,
        blobs: BlobStore,
        owner: str,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.staging = staging
        self.blobs = blobs
        self.owner = owner
        self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="hash")

    def stage(self, packets: Sequence[Packet]) -> StageResult:
        """Make packets durable: large payloads to staging, then the catalog.

        Returns each packet's outcome, in order, the small text files stored
        on the way, and the files that became complete and need finalizing.
        """
        finished = self._finished_files(packets)
        segments: dict[str, list[Packet]] = {}
        staged: list[tuple[Packet, str | None]] = []
        for packet in packets:
            if packet.file_id in finished:
                continue
            if len(packet.data) <= self.settings.inline_chunk_bytes:
                staged.append((packet, None))
            else:
                segments.setdefault(packet.file_id, []).append(packet)

        # A batch's large chunks of one file go to disk as one segment: one
        # fsync per file and batch instead of one per chunk, which is what
        # lets staging keep up with the broker.
        keys = []
        for file_id, group in segments.items():
            segment = f"{group[0].seq:08d}-{uuid.uuid4().hex[:12]}"
            keys.append(f"{file_id}/{segment}")
            self.staging.put(keys[-1], b"".join(p.data for p in group))
            offset = 0
            for packet in group:
                staged.append((packet, f"{segment}@{offset}"))
                offset += len(packet.data)

        # The catalog row is what makes a chunk count, so the staged bytes
        # must be durable before it commits.
        self.staging.sync(keys)
        result = self.catalog.stage(
            staged,
            self.settings.inline_chunk_bytes,
            min(self.settings.inline_text_bytes, self.settings.max_text_bytes),
        )
        recorded = iter(result.outcomes)
        result.outcomes = [
            StageOutcome(p, "duplicate", "file is finished")
            if p.file_id in finished
            else next(recorded)
            for p in packets
        ]
        return result

    def _finished_files(self, packets: Sequence[Packet]) -> set[str]:
        """Files past receiving: a late duplicate's bytes would only be litter."""
        large = sorted(
            {
                p.file_id
                for p in packets
                if len(p.data) > self.settings.inline_chunk_bytes
            }
        )
        states = self.catalog.states(large)
        return {f for f, state in states.items() if state not in (RECEIVING, EXPIRED)}

    def finalize(self, file_id: str) -> Finalized | None:
        """Assemble, verify and store a complete file, if this worker wins it."""
        if not self.catalog.claim(file_id, self.owner, self.settings.lease_seconds):
            return None
        record = self.catalog.get(file_id)
        if record is None:
            return None
        started = time.monotonic()
        log.debug("file.assembling", file_id=file_id, packets=record.total_seq)

        hasher = hashlib.sha256()
        try:
            state, location, text, error = self._store(record, hasher)
        except IntegrityError as exc:
            state, location, text, error = FAILED, None, None, str(exc)
        sha256 = hasher.hexdigest()
        mismatch = integrity_error(sha256, record.expected_sha256)
        if state == STORED and mismatch:
            state, location, text, error = FAILED, None, None, mismatch

        finished = self.catalog.finish(
            record,
            self.owner,
            state=state,
            size=record.received_bytes,
            sha256=sha256,
            location=location,
            error=error,
            text=text,
        )
        if not finished:
            log.warning("file.lease_lost", file_id=file_id, owner=self.owner)
            return None
        self.staging.delete_prefix(file_id)
        if state == FAILED:
            self._discard_blob(record)
            log.error("file.failed", file_id=file_id, reason=error)
        updated = self.catalog.get(file_id) or record
        return Finalized(updated, state, time.monotonic() - started)

    def _store(
        self, record: FileRecord, hasher: hashlib._Hash
    ) -> tuple[str, str | None, bytes | None, str | None]:
        blocks = self._blocks(record, hasher)
        if (
            record.type == "text"
            and record.received_bytes <= self.settings.max_text_bytes
        ):
            text = b"".join(blocks)
            return STORED, TEXT_LOCATION + record.file_id, text, None
        location = self.blobs.put_stream(
            blob_key(record), blocks, sha256=record.expected_sha256
        )
        return STORED, location, None, None

    def _blocks(self, record: FileRecord, hasher: hashlib._Hash) -> Iterator[bytes]:
        """The file's bytes in seq order, hashed on the way, lease kept alive."""
        expected_seq = 1
        renew_at = time.monotonic() + self.settings.lease_seconds / 3
        # A large block is hashed in another thread while the caller writes
        # it (hashlib lets go of the GIL); updates stay one at a time, in order.
        hashing: Future[None] | None = None
        for chunk in self.catalog.chunks(record.file_id):
            if chunk.seq != expected_seq:
                raise StorageError(
                    f"file {record.file_id} lacks chunk {expected_seq} at assembly"
                )
            expected_seq += 1
            if chunk.inline_data is not None:
                data = chunk.inline_data
            else:
                data = self._read_staged(record.file_id, chunk)
            if len(data) != chunk.size:
                raise IntegrityError(
                    f"staged chunk {chunk.seq} of {record.file_id} has "
                    f"{len(data)} bytes, {chunk.size} were recorded"
                )
            if hashing is not None:
                hashing.result()
                hashing = None
            if len(data) >= THREADED_HASH_BYTES:
                hashing = self._hash_pool.submit(hasher.update, data)
            else:
                hasher.update(data)
            yield data

            if time.monotonic() > renew_at:
                if not self.catalog.renew(
                    record.file_id, self.owner, self.settings.lease_seconds
                ):
                    raise StorageError(f"lost the lease on {record.file_id}")
                renew_at = time.monotonic() + self.settings.lease_seconds / 3
        if hashing is not None:
            hashing.result()

    def _read_staged(self, file_id: str, chunk: StagedChunk) -> bytes:
        segment, _, offset = (chunk.staged_name or "").partition("@")
        start = int(offset or 0)
        return b"".join(
            self.staging.open_range(f"{file_id}/{segment}", start, start + chunk.size)
        )

    def close(self) -> None:
        self._hash_pool.shutdown(wait=True)

    def sweep_staging(self) -> None:
        """Remove staged chunks of files that no longer need them.

        They are left behind by a worker that died between recording a file's
        end and deleting its chunks, or by a duplicate staged while the file
        was being finalized.
        """
        folders = self.staging.list_prefixes("")
        for start in range(0, len(folders), 500):
            group = folders[start : start + 500]
            for file_id, state in self.catalog.states(group).items():
                if state not in (RECEIVING, ASSEMBLING):
                    self.staging.delete_prefix(file_id)

    def _discard_blob(self, record: FileRecord) -> None:
        if record.type != "text":
            self.blobs.delete_prefix(blob_folder(record))


def blob_folder(record: FileRecord) -> str:
    return f"{record.type}/{record.file_id[:2]}/{record.file_id}"


def blob_key(record: FileRecord) -> str:
    """Fixed by the file, so that a redone store replaces instead of adding."""
    name = UNSAFE_NAME.sub("_", PurePosixPath(record.file_name or "").name)
    return f"{blob_folder(record)}/{name.lstrip('.') or 'data'}"
