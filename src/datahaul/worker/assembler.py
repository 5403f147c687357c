"""Staging packets and putting whole files together: the workers' blocking core.

Both steps are written to be repeated safely: a packet staged twice is
recorded once, and a file finalized twice ends up stored once, because
every write lands under a name fixed by the file and the catalog decides
who wins.
"""

from __future__ import annotations

import errno
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
    staged_object,
)
from datahaul.storage.digests import Digests, FileHasher, integrity_error

log = structlog.get_logger("datahaul.worker")

UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
# Below this, a thread hop costs more than the hashing it would overlap.
THREADED_HASH_BYTES = 64 * 1024
# Files a worker keeps an image of at once; past it the oldest lose the
# shortcut at finalize, nothing else.
OPEN_IMAGES = 1024
# A hard link fails with these where the filesystem cannot link the file.
NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP}


@dataclass
class Finalized:
    """The end of one file, as the worker that finished it saw it."""

    record: FileRecord
    state: str
    duration: float
    linked: bool = False  # stored by linking its staged image, not copied


@dataclass
class Stored:
    """What storing a complete file came to, before the catalog hears of it."""

    state: str
    digests: Digests
    location: str | None = None
    text: bytes | None = None
    error: str | None = None
    linked: bool = False


@dataclass
class FileImage:
    """A staging segment laid out as the file: chunk k at (k - 1) * chunk_bytes.

    A worker writes a file's chunks there as they come, in any order, and
    hashes the file's prefix as it fills in. Once every chunk is recorded
    there, the segment is the file, and finalize adopts it as the blob
    instead of reading it back and copying it.
    """

    name: str
    total_seq: int
    chunk_bytes: int
    # seq -> size of the chunks the catalog recorded in this segment.
    recorded: dict[int, int] = field(default_factory=dict)
    next_seq: int = 1  # the first chunk not yet hashed
    hashed_bytes: int = 0
    hasher: FileHasher = field(default_factory=FileHasher)
    # The hasher's work on the last batch, done on the hash thread.
    hashing: Future[None] | None = None

    def fits(self, packet: Packet) -> bool:
        """Whether the chunk has its place here and the place is still free.

        A place once recorded is never written again: the catalog points at
        those bytes, and a later packet with the same seq may differ.
        """
        if packet.total_seq != self.total_seq or packet.seq in self.recorded:
            return False
        size = len(packet.data)
        if packet.seq < self.total_seq:
            return size == self.chunk_bytes
        return 0 < size <= self.chunk_bytes

    def offset_of(self, seq: int) -> int:
        return (seq - 1) * self.chunk_bytes

    def digests_of(self, total_seq: int, size: int) -> Digests | None:
        complete = self.next_seq == total_seq + 1 and self.hashed_bytes == size
        if not complete:
            return None
        if self.hashing is not None:
            self.hashing.result()
        return self.hasher.digests()


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
        self._images: dict[str, FileImage] = {}
        self._sealed: dict[str, FileImage] = {}

    def stage(self, packets: Sequence[Packet], *, again: bool = True) -> StageResult:
        """Make packets durable: large payloads to staging, then the catalog.

        Returns each packet's outcome, in order, the small text files stored
        on the way, and the files that became complete and need finalizing.
        Packets the catalog calls stale are staged once `again`, afresh.
        """
        finished = self._finished_files(packets)
        # Packets are known by their index in `packets` from here on: the
        # same packet may come twice, and outcomes must follow the order
        # the packets came in, not the order they are staged in.
        names: dict[int, str | None] = {}
        in_image: dict[str, list[int]] = {}
        segments: dict[str, list[int]] = {}
        for index in sorted(
            range(len(packets)), key=lambda i: (packets[i].file_id, packets[i].seq)
        ):
            packet = packets[index]
            if packet.file_id in finished:
                continue
            image = self._image_for(packet)
            if image is not None and image.fits(packet):
                placed = in_image.setdefault(packet.file_id, [])
                if not placed or packets[placed[-1]].seq != packet.seq:
                    placed.append(index)
                    continue
            if len(packet.data) <= self.settings.inline_chunk_bytes:
                names[index] = None
            else:
                segments.setdefault(packet.file_id, []).append(index)

        self._write_images(packets, in_image, names)
        # The rest of a batch's large chunks of one file go to disk as one
        # segment: one fsync per file and batch instead of one per chunk.
        keys = []
        for file_id, group in segments.items():
            segment = f"{packets[group[0]].seq:08d}-{uuid.uuid4().hex[:12]}"
            keys.append(f"{file_id}/{segment}")
            self.staging.put(keys[-1], b"".join(packets[i].data for i in group))
            offset = 0
            for index in group:
                names[index] = f"{segment}@{offset}"
                offset += len(packets[index].data)

        # The catalog row is what makes a chunk count, so the staged bytes
        # must be durable before it commits (an image's are once written).
        self.staging.sync(keys)
        try:
            result = self.catalog.stage(
                [(packets[i], name) for i, name in names.items()],
                self.settings.inline_chunk_bytes,
                min(self.settings.inline_text_bytes, self.settings.max_text_bytes),
            )
        except BaseException:
            # Whether the commit happened is unknown, so which places are
            # taken is too: these files start a new image.
            for file_id in in_image:
                self._images.pop(file_id, None)
            raise
        outcome_of = dict(zip(names, result.outcomes, strict=True))
        stale = [i for i, outcome in outcome_of.items() if outcome.status == "stale"]
        if stale:
            self._drop_stale(packets, stale, names)
        self._follow_images(packets, in_image, outcome_of, result)
        if stale:
            self._stage_stale_again(packets, stale, outcome_of, result, again)
        result.outcomes = [
            StageOutcome(p, "duplicate", "file is finished")
            if p.file_id in finished
            else outcome_of[i]
            for i, p in enumerate(packets)
        ]
        return result

    def _drop_stale(
        self, packets: Sequence[Packet], stale: list[int], names: dict[int, str | None]
    ) -> None:
        """Forget the images stale chunks went into, and delete what they wrote.

        The file expired while this worker held its image: the expiry may
        have removed the image already, or will, so nothing in it counts.
        """
        files, keys = set(), set()
        for index in stale:
            file_id, name = packets[index].file_id, names[index]
            self._images.pop(file_id, None)
            files.add(file_id)
            if name is not None:
                keys.add(f"{file_id}/{staged_object(name)}")
        self.staging.delete_keys(sorted(keys))
        log.info(
            "file.stale_chunks_restaged",
            file_ids=sorted(files),
            packets=len(stale),
            objects=len(keys),
        )

    def _stage_stale_again(
        self,
        packets: Sequence[Packet],
        stale: list[int],
        outcome_of: dict[int, StageOutcome],
        result: StageResult,
        again: bool,
    ) -> None:
        if not again:
            # New objects have new names, which no expiry can have discarded.
            raise StorageError(
                f"chunks of {packets[stale[0]].file_id} were staged twice into "
                "objects its expiry discarded; the batch will be tried again"
            )
        retried = self.stage([packets[i] for i in stale], again=False)
        outcome_of.update(zip(stale, retried.outcomes, strict=True))
        result.complete |= retried.complete
        result.finished.extend(retried.finished)

    def _image_for(self, packet: Packet) -> FileImage | None:
        """The file's image in this worker, begun by its first large chunk.

        Only a filesystem can write at offsets. The chunk size is learnt
        from a chunk that is not the last, which may be shorter.
        """
        image = self._images.get(packet.file_id)
        if image is not None or not isinstance(self.staging, FilesystemStore):
            return image
        size = len(packet.data)
        if size <= self.settings.inline_chunk_bytes:
            return None
        if packet.seq == packet.total_seq and packet.total_seq > 1:
            return None
        if len(self._images) >= OPEN_IMAGES:
            del self._images[next(iter(self._images))]
        name = f"{packet.seq:08d}-{uuid.uuid4().hex[:12]}-image"
        image = FileImage(name, packet.total_seq, size)
        self._images[packet.file_id] = image
        return image

    def _write_images(
        self,
        packets: Sequence[Packet],
        in_image: dict[str, list[int]],
        names: dict[int, str | None],
    ) -> None:
        """Write each chunk at its place in its file's image, durably; name it
        in `names`."""
        staging = self.staging
        if not isinstance(staging, FilesystemStore):
            return
        for file_id, group in in_image.items():
            image = self._images[file_id]
            places = [image.offset_of(packets[i].seq) for i in group]
            staging.write_at(
                f"{file_id}/{image.name}",
                [(at, packets[i].data) for i, at in zip(group, places, strict=True)],
            )
            names.update(
                (i, f"{image.name}@{at}") for i, at in zip(group, places, strict=True)
            )

    def _follow_images(
        self,
        packets: Sequence[Packet],
        in_image: dict[str, list[int]],
        outcome_of: dict[int, StageOutcome],
        result: StageResult,
    ) -> None:
        """Note the places the catalog took; hash the prefix; seal whole files."""
        for file_id, group in in_image.items():
            image = self._images.get(file_id)
            if image is None:
                continue
            fresh = {
                packets[i].seq: packets[i].data
                for i in group
                if outcome_of[i].status == "staged"
            }
            image.recorded.update((seq, len(data)) for seq, data in fresh.items())
            self._hash_prefix(file_id, image, fresh)

        for file_id in result.complete:
            image = self._images.pop(file_id, None)
            if image is not None:
                if len(self._sealed) >= OPEN_IMAGES:
                    # pop, not del: finalize may take the same one meanwhile.
                    self._sealed.pop(next(iter(self._sealed)), None)
                self._sealed[file_id] = image
        for record in result.finished:
            self._images.pop(record.file_id, None)

    def _hash_prefix(
        self, file_id: str, image: FileImage, fresh: dict[int, bytes]
    ) -> None:
        """Hash the chunks that now follow the hashed prefix, in seq order.

        Chunks of this batch are at hand; ones that came early are read
        back from the image: from the disk, as the image is written around
        the page cache.
        """
        blocks = []
        while image.next_seq in image.recorded:
            seq = image.next_seq
            data = fresh.get(seq)
            if data is None:
                start, size = image.offset_of(seq), image.recorded[seq]
                key = f"{file_id}/{image.name}"
                data = b"".join(self.staging.open_range(key, start, start + size))
            blocks.append(data)
            image.hashed_bytes += len(data)
            image.next_seq += 1
        if not blocks:
            return
        # The hash thread hashes this batch while this thread stages the
        # next one; waiting for the batch before keeps one batch in memory.
        if image.hashing is not None:
            image.hashing.result()
        image.hashing = self._hash_pool.submit(_hash_all, image.hasher, blocks)

    def _finished_files(self, packets: Sequence[Packet]) -> set[str]:
        """Files past receiving: a late duplicate's bytes would only be litter."""
        large = sorted(
            {
                p.file_id
                for p in packets
                if len(p.data) > self.settings.inline_chunk_bytes
                or p.file_id in self._images
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

        hasher = FileHasher()
        try:
            stored = self._store(record, hasher, sealed)
        except IntegrityError as exc:
            stored = Stored(FAILED, hasher.digests(), error=str(exc))
        mismatch = integrity_error(
            stored.digests, record.expected_sha256, record.expected_xxh128
        )
        if stored.state == STORED and mismatch:
            stored = Stored(FAILED, stored.digests, error=mismatch)

        finished = self.catalog.finish(
            record,
            self.owner,
            state=stored.state,
            size=record.received_bytes,
            sha256=stored.digests.sha256,
            location=stored.location,
            error=stored.error,
            text=stored.text,
        )
        if not finished:
            log.warning("file.lease_lost", file_id=file_id, owner=self.owner)
            return None
        self.staging.delete_prefix(file_id)
        if stored.state == FAILED:
            self._discard_blob(record)
            log.error("file.failed", file_id=file_id, reason=stored.error)
        updated = self.catalog.get(file_id) or record
        duration = time.monotonic() - started
        return Finalized(updated, stored.state, duration, stored.linked)

    def _store(
        self, record: FileRecord, hasher: FileHasher, sealed: FileImage | None
    ) -> Stored:
        if (
            record.type == "text"
            and record.received_bytes <= self.settings.max_text_bytes
        ):
            text = b"".join(self._blocks(record, hasher))
            location = TEXT_LOCATION + record.file_id
            return Stored(STORED, hasher.digests(), location, text)

        adopted = self._adopt_segment(record, sealed)
        if adopted is not None:
            return adopted
        location = self.blobs.put_stream(
            blob_key(record),
            self._blocks(record, hasher),
            sha256=record.expected_sha256,
        )
        return Stored(STORED, hasher.digests(), location)

    def _adopt_segment(
        self, record: FileRecord, sealed: FileImage | None
    ) -> Stored | None:
        """Store the file by linking its staging segment, where it is one.

        That saves reading every byte back and writing it again. The SHA-256
        compared with the sender's is the one taken as the chunks were
        recorded, when this worker staged them all, or else one read
        through the segment.
        """
        if not isinstance(self.staging, FilesystemStore) or not isinstance(
            self.blobs, FilesystemStore
        ):
            return None
        name = self._whole_segment(record)
        if name is None:
            return None
        path = self.staging.path(f"{record.file_id}/{name}")
        try:
            if path.stat().st_size != record.received_bytes:
                return None
        except FileNotFoundError:
            return None  # the copying path names what is missing

        digests = None
        if sealed is not None and sealed.name == name:
            digests = sealed.digests_of(record.total_seq, record.received_bytes)
        if digests is None:
            hasher = FileHasher()
            for _ in self._blocks(record, hasher):
                pass
            digests = hasher.digests()
        mismatch = integrity_error(
            digests, record.expected_sha256, record.expected_xxh128
        )
        if mismatch:
            return Stored(FAILED, digests, error=mismatch)

        try:
            location = self.blobs.adopt(blob_key(record), path)
        except OSError as exc:
            if exc.errno not in NO_LINK:
                raise
            return None
        return Stored(STORED, digests, location, linked=True)

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

    def _blocks(self, record: FileRecord, hasher: FileHasher) -> Iterator[bytes]:
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

    def expire(self, older_than: float) -> list[str]:
        """Expire files idle since before `older_than`; remove their staging.

        The staging folder is listed before the catalog decides, so that
        whatever a packet stages after the file starts over is not in it.
        """
        listed = {
            file_id: self.staging.list_names(file_id)
            for file_id in self.catalog.stale_files(older_than)
        }
        expired = self.catalog.expire(older_than, listed)
        for file_id in expired:
            self._images.pop(file_id, None)
        self.remove_discarded()
        return expired

    def remove_discarded(self) -> None:
        """Remove the staged objects that expiries discarded."""
        while objects := self.catalog.objects_to_remove():
            self.staging.delete_keys(f"{file_id}/{name}" for file_id, name in objects)
            self.catalog.mark_removed(objects)

    def sweep_staging(self) -> None:
        """Remove staged chunks of files that no longer need them.

        They are left behind by a worker that died between recording a file's
        end and deleting its chunks, or by a duplicate staged while the file
        was being finalized. An expired file's folder is not deleted whole:
        the file may start over at any moment.
        """
        folders = self.staging.list_prefixes("")
        for start in range(0, len(folders), 500):
            group = folders[start : start + 500]
            for file_id, state in self.catalog.states(group).items():
                if state == EXPIRED:
                    listed = self.staging.list_names(file_id)
                    self.catalog.discard_leftovers(file_id, listed)
                elif state not in (RECEIVING, ASSEMBLING):
                    self.staging.delete_prefix(file_id)
        self.remove_discarded()

    def _discard_blob(self, record: FileRecord) -> None:
        if record.type != "text":
            self.blobs.delete_prefix(blob_folder(record))


def blob_folder(record: FileRecord) -> str:
    return f"{record.type}/{record.file_id[:2]}/{record.file_id}"


def blob_key(record: FileRecord) -> str:
    """Fixed by the file, so that a redone store replaces instead of adding."""
    name = UNSAFE_NAME.sub("_", PurePosixPath(record.file_name or "").name)
    return f"{blob_folder(record)}/{name.lstrip('.') or 'data'}"


def _hash_all(hasher: FileHasher, blocks: Sequence[bytes]) -> None:
    for block in blocks:
        hasher.update(block)
