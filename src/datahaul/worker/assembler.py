"""Staging packets and putting whole files together: the workers' blocking core.

Both steps are written to be repeated safely: a packet staged twice is
recorded once, and a file finalized twice ends up stored once, because
every write lands under a name fixed by the file and the catalog decides
who wins.
"""

from __future__ import annotations

import errno
import hashlib
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import structlog

from datahaul.config import Settings
from datahaul.errors import IntegrityError, StorageError
from datahaul.protocol.packet import Packet
from datahaul.storage.blobs import BlobStore, FilesystemStore
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
# Files whose segment a worker keeps open at once; past it the oldest lose
# the shortcut at finalize, nothing else.
OPEN_SEGMENTS = 1024
# A hard link fails with these where the filesystem cannot link the file.
NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP}


@dataclass
class Finalized:
    """The end of one file, as the worker that finished it saw it."""

    record: FileRecord
    state: str
    duration: float


@dataclass
class OpenSegment:
    """The staging file a worker appends one file's chunks to, as it goes.

    While every chunk arrives once and in order, the segment is the file
    itself and `hasher` holds its SHA-256 so far; finalize can then adopt
    the segment as the blob instead of reading it back and copying it.
    """

    name: str
    next_seq: int = 1
    hashed_bytes: int = 0
    hasher: hashlib._Hash | None = field(default_factory=hashlib.sha256)

    def record(self, seq: int, offset: int, data: bytes, new: bool) -> None:
        """Follow one appended chunk; any other order gives the hash up."""
        if self.hasher is None:
            return
        if not new or seq != self.next_seq or offset != self.hashed_bytes:
            self.hasher = None
            return
        self.hasher.update(data)
        self.next_seq += 1
        self.hashed_bytes += len(data)

    def digest_of(self, total_seq: int, size: int) -> str | None:
        complete = self.next_seq == total_seq + 1 and self.hashed_bytes == size
        return self.hasher.hexdigest() if self.hasher and complete else None


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
        # Touched only by the staging thread; finalize takes what it needs
        # from `_sealed`, which the staging thread fills once a file is whole.
        self._open: dict[str, OpenSegment] = {}
        self._sealed: dict[str, OpenSegment] = {}

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
            # A small last chunk joins its file's open segment, so that the
            # segment can still become the whole file.
            small = len(packet.data) <= self.settings.inline_chunk_bytes
            if small and packet.file_id not in self._open:
                staged.append((packet, None))
            else:
                segments.setdefault(packet.file_id, []).append(packet)

        # A batch's large chunks of one file go to disk together: one fsync
        # per file and batch instead of one per chunk, which is what lets
        # staging keep up with the broker.
        keys, appended = [], []
        for file_id, group in segments.items():
            group.sort(key=lambda p: p.seq)
            key, placed = self._write_segment(file_id, group)
            keys.append(key)
            appended.extend(placed)
            staged.extend((p, f"{key.rpartition('/')[2]}@{at}") for p, at in placed)

        # The catalog row is what makes a chunk count, so the staged bytes
        # must be durable before it commits.
        self.staging.sync(keys)
        result = self.catalog.stage(
            staged,
            self.settings.inline_chunk_bytes,
            min(self.settings.inline_text_bytes, self.settings.max_text_bytes),
        )
        self._follow_segments(appended, result)
        recorded = iter(result.outcomes)
        result.outcomes = [
            StageOutcome(p, "duplicate", "file is finished")
            if p.file_id in finished
            else next(recorded)
            for p in packets
        ]
        return result

    def _write_segment(
        self, file_id: str, group: list[Packet]
    ) -> tuple[str, list[tuple[Packet, int]]]:
        """Stage one file's chunks of a batch; return the key and each offset.

        On a filesystem the file's open segment grows batch by batch; other
        stores, which cannot append, get a segment per batch.
        """
        body = b"".join(p.data for p in group)
        if isinstance(self.staging, FilesystemStore):
            segment = self._open.get(file_id)
            if segment is None:
                segment = self._open_segment(file_id, group[0].seq)
            key = f"{file_id}/{segment.name}"
            offset = self.staging.append(key, body)
        else:
            key = f"{file_id}/{group[0].seq:08d}-{uuid.uuid4().hex[:12]}"
            self.staging.put(key, body)
            offset = 0

        placed = []
        for packet in group:
            placed.append((packet, offset))
            offset += len(packet.data)
        return key, placed

    def _open_segment(self, file_id: str, first_seq: int) -> OpenSegment:
        if len(self._open) >= OPEN_SEGMENTS:
            del self._open[next(iter(self._open))]
        segment = OpenSegment(f"{first_seq:08d}-{uuid.uuid4().hex[:12]}")
        self._open[file_id] = segment
        return segment

    def _follow_segments(
        self, appended: list[tuple[Packet, int]], result: StageResult
    ) -> None:
        """Hash what was appended in order; seal the segments of whole files."""
        new = {id(o.packet) for o in result.outcomes if o.status == "staged"}
        for packet, offset in appended:
            segment = self._open.get(packet.file_id)
            if segment is not None:
                segment.record(packet.seq, offset, packet.data, id(packet) in new)

        for file_id in result.complete:
            segment = self._open.pop(file_id, None)
            if segment is not None:
                if len(self._sealed) >= OPEN_SEGMENTS:
                    del self._sealed[next(iter(self._sealed))]
                self._sealed[file_id] = segment
        for record in result.finished:
            self._open.pop(record.file_id, None)

    def _finished_files(self, packets: Sequence[Packet]) -> set[str]:
        """Files past receiving: a late duplicate's bytes would only be litter."""
        large = sorted(
            {
                p.file_id
                for p in packets
                if len(p.data) > self.settings.inline_chunk_bytes
                or p.file_id in self._open
            }
        )
        states = self.catalog.states(large)
        return {f for f, state in states.items() if state not in (RECEIVING, EXPIRED)}

    def finalize(self, file_id: str) -> Finalized | None:
        """Assemble, verify and store a complete file, if this worker wins it."""
        sealed = self._sealed.pop(file_id, None)
        if not self.catalog.claim(file_id, self.owner, self.settings.lease_seconds):
            return None
        record = self.catalog.get(file_id)
        if record is None:
            return None
        started = time.monotonic()
        log.debug("file.assembling", file_id=file_id, packets=record.total_seq)

        hasher = hashlib.sha256()
        try:
            state, location, text, error, sha256 = self._store(record, hasher, sealed)
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
        self, record: FileRecord, hasher: hashlib._Hash, sealed: OpenSegment | None
    ) -> tuple[str, str | None, bytes | None, str | None, str]:
        """Store the file; return its state, location, text, error and SHA-256."""
        if (
            record.type == "text"
            and record.received_bytes <= self.settings.max_text_bytes
        ):
            text = b"".join(self._blocks(record, hasher))
            location = TEXT_LOCATION + record.file_id
            return STORED, location, text, None, hasher.hexdigest()

        adopted = self._adopt_segment(record, sealed)
        if adopted is not None:
            return adopted
        location = self.blobs.put_stream(
            blob_key(record),
            self._blocks(record, hasher),
            sha256=record.expected_sha256,
        )
        return STORED, location, None, None, hasher.hexdigest()

    def _adopt_segment(
        self, record: FileRecord, sealed: OpenSegment | None
    ) -> tuple[str, str | None, bytes | None, str | None, str] | None:
        """Store the file by linking its staging segment, where it is one.

        That saves reading every byte back and writing it again. The bytes
        are checked as on the copying path: by the hash taken as they were
        staged, or else by reading the segment through.
        """
        if not isinstance(self.staging, FilesystemStore) or not isinstance(
            self.blobs, FilesystemStore
        ):
            return None
        name = self._whole_segment(record)
        if name is None:
            return None
        path = self.staging.path(f"{record.file_id}/{name}")
        if path.stat().st_size != record.received_bytes:
            return None

        digest = None
        if sealed is not None and sealed.name == name:
            digest = sealed.digest_of(record.total_seq, record.received_bytes)
        if digest is None:
            hasher = hashlib.sha256()
            for _ in self._blocks(record, hasher):
                pass
            digest = hasher.hexdigest()
        mismatch = integrity_error(digest, record.expected_sha256)
        if mismatch:
            return FAILED, None, None, mismatch, digest

        try:
            location = self.blobs.adopt(blob_key(record), path)
        except OSError as exc:
            if exc.errno not in NO_LINK:
                raise
            return None
        log.debug("file.adopted", file_id=record.file_id, segment=name)
        return STORED, location, None, None, digest

    def _whole_segment(self, record: FileRecord) -> str | None:
        """The one staging segment holding the file's chunks in order, if any."""
        name, expected_offset, expected_seq = None, 0, 1
        for chunk in self.catalog.chunks(record.file_id):
            segment, _, offset = (chunk.staged_name or "").partition("@")
            if (
                not segment
                or chunk.seq != expected_seq
                or int(offset or 0) != expected_offset
                or segment != (name or segment)
            ):
                return None
            name = segment
            expected_offset += chunk.size
            expected_seq += 1
        if expected_seq != record.total_seq + 1:
            return None
        return name

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
