"""Cutting a file into packets: sizes, types, the file's identity and its chunks.

Nothing here talks to the network; everything a send needs to know about a file
before the first request is decided here, so that it can be tested alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import math
import mimetypes
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from datahaul.errors import ConfigError
from datahaul.protocol.packet import DATA_TYPES, FILE_ID_PATTERN, DataType
from datahaul.sender.errors import FileChanged

KiB = 1024
MiB = 1024 * KiB

DEFAULT_CHUNK_SIZE = 256 * KiB
MAX_CHUNK_SIZE = 16 * MiB
FILE_ID_HEX_DIGITS = 32

# Reading in large blocks keeps the hashing pass near disk speed without
# holding more than one block of the file at a time.
HASH_BLOCK_BYTES = 1 * MiB

_SIZE_PATTERN = re.compile(
    r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmg]?)(?:i?b)?\s*$", re.IGNORECASE
)
_UNIT_BYTES = {"": 1, "k": KiB, "m": MiB, "g": 1024 * MiB}

# Telemetry formats the mimetypes table does not know, or files as application/*.
_TEXT_SUFFIXES = {
    ".log": "text/plain",
    ".txt": "text/plain",
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".ndjson": "application/x-ndjson",
    ".jsonl": "application/x-ndjson",
    ".json": "application/json",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
}
_TEXT_CONTENT_TYPES = {
    "application/json",
    "application/x-ndjson",
    "application/xml",
    "application/yaml",
    "application/x-yaml",
}


def parse_size(text: str | int, *, limit: int = MAX_CHUNK_SIZE) -> int:
    """Bytes from '1048576', '256K', '1M' or '1.5MiB' (K, M and G are powers of 2)."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE_PATTERN.match(text)
        if match is None:
            raise ConfigError(
                f"chunk size {text!r} is not a size; write a number of bytes "
                "with an optional K, M or G suffix, such as 262144, 256K or 1M"
            )
        unit = _UNIT_BYTES[match["unit"].lower()]
        size = math.floor(float(match["number"]) * unit)
    if size < 1:
        raise ConfigError(f"chunk size {text!r} must be at least 1 byte")
    if size > limit:
        raise ConfigError(
            f"chunk size {text!r} is {size} bytes, over the limit of {limit} "
            f"bytes ({limit // MiB} MiB); choose a smaller --chunk-size"
        )
    return size


def guess_content_type(name: str) -> str | None:
    """The MIME type a file's name suggests, or None when nothing does."""
    suffix = Path(name).suffix.lower()
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or _TEXT_SUFFIXES.get(suffix)


def infer_type(name: str, content_type: str | None = None) -> DataType:
    """text, image or video from a file's name; ConfigError asking for --type."""
    suffix = Path(name).suffix.lower()
    guessed = content_type or guess_content_type(name)
    if suffix in _TEXT_SUFFIXES:
        return "text"
    if guessed is not None:
        major = guessed.split("/", 1)[0]
        if major == "text" or guessed in _TEXT_CONTENT_TYPES:
            return "text"
        if major == "image":
            return "image"
        if major == "video":
            return "video"
    found = f"its content type is {guessed}" if guessed else "its type is unknown"
    raise ConfigError(
        f"cannot tell whether {name} is text, image or video ({found}); "
        f"pass --type {'|'.join(DATA_TYPES)}"
    )


def check_type(value: str) -> DataType:
    """A type given by a person, checked against the protocol's types."""
    for known in DATA_TYPES:
        if value == known:
            return known  # type: ignore[return-value]
    raise ConfigError(
        f"type {value!r} is not one of {', '.join(DATA_TYPES)}; "
        f"pass --type {'|'.join(DATA_TYPES)}"
    )


def check_file_id(file_id: str) -> str:
    """A file id chosen by a person, checked against the protocol's rule."""
    if not FILE_ID_PATTERN.match(file_id):
        raise ConfigError(
            f"file id {file_id!r} is not allowed: use 1-128 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return file_id


def content_id(source: ChunkSource) -> str:
    """The default file id: the XXH128 of the content, 32 hex digits.

    The same content always maps to the same id, so a re-send resumes
    instead of storing the file twice. XXH128 and not the SHA-256: the id
    is needed before the first packet can leave, and XXH128 reads a GiB in
    a fifth of the time SHA-256 takes to hash it. The id is no security
    boundary: a client may name any id.
    """
    digest = xxhash.xxh3_128()
    for offset in range(0, source.size, HASH_BLOCK_BYTES):
        digest.update(source.read(offset, HASH_BLOCK_BYTES))
    return digest.hexdigest()


def default_file_id(content: bytes) -> str:
    """The id `datahaul send` gives a file with this content."""
    return xxhash.xxh3_128_hexdigest(content)


def total_seq_for(size: int, chunk_size: int) -> int:
    """How many packets a file of `size` bytes needs; an empty file still needs one."""
    return max(1, math.ceil(size / chunk_size))


# Files up to this size are read into memory once when opened.
WHOLE_FILE_BYTES = 256 * 1024


class ChunkSource(Protocol):
    """Where a file's bytes come from: read any range, again, without the rest."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class BytesSource:
    """Bytes already in memory, such as a buffer a robot produced."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset : offset + length])


class FileSource:
    """A file on disk, read range by range through one descriptor.

    The size and modification time seen when it was opened are kept, so that a
    file changed while it is sent is noticed instead of arriving corrupted.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        stat = os.fstat(self._fd)
        self._size = stat.st_size
        self._mtime_ns = stat.st_mtime_ns
        # Which file this is, as a digest worked out beforehand must match.
        self.identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        # A small file is read once: many tiny reads of it cost more in
        # system calls than holding it.
        self._whole = (
            os.pread(self._fd, self._size, 0)
            if self._size <= WHOLE_FILE_BYTES
            else None
        )

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if self._whole is not None:
            data = self._whole[offset : offset + length]
        else:
            data = os.pread(self._fd, length, offset)
        if len(data) != min(length, max(0, self._size - offset)):
            raise self._changed()
        return data

    def check_unchanged(self) -> None:
        stat = os.fstat(self._fd)
        if stat.st_size != self._size or stat.st_mtime_ns != self._mtime_ns:
            raise self._changed()

    def close(self) -> None:
        os.close(self._fd)

    def _changed(self) -> FileChanged:
        return FileChanged(
            f"{self.path} changed while it was being sent; send it again once "
            "nothing writes to it any more (or send a copy)"
        )


def sha256_of(source: ChunkSource, stop: threading.Event | None = None) -> str:
    """The SHA-256 of a whole source, one block in memory at a time."""
    digest = hashlib.sha256()
    for offset in range(0, source.size, HASH_BLOCK_BYTES):
        if stop is not None and stop.is_set():
            raise HashAbandoned("the send this hash was for has ended")
        digest.update(source.read(offset, HASH_BLOCK_BYTES))
    return digest.hexdigest()


@dataclass(frozen=True)
class ChunkPlan:
    """Where each of a file's packets starts and ends."""

    size: int
    chunk_size: int

    @functools.cached_property
    def total_seq(self) -> int:
        # Asked for every packet's offset and length: worked out once.
        return total_seq_for(self.size, self.chunk_size)

    def offset(self, seq: int) -> int:
        self._check(seq)
        return (seq - 1) * self.chunk_size

    def length(self, seq: int) -> int:
        self._check(seq)
        return min(self.chunk_size, self.size - (seq - 1) * self.chunk_size)

    def _check(self, seq: int) -> None:
        if not 1 <= seq <= self.total_seq:
            raise ValueError(f"seq {seq} is outside 1..{self.total_seq}")


def seqs_in_ranges(ranges: list[list[int]], total_seq: int) -> list[int]:
    """Every seq in the gateway's inclusive [first, last] ranges, in order."""
    seqs: set[int] = set()
    for first, last in ranges:
        if not 1 <= first <= last <= total_seq:
            raise ValueError(f"range [{first}, {last}] is outside 1..{total_seq}")
        seqs.update(range(first, last + 1))
    return sorted(seqs)


class HashAbandoned(Exception):
    """Raised in a background hash whose send ended before it was done."""


class PendingSha256:
    """A file's SHA-256 while it is still being worked out.

    It comes from the early hash's child when one was started for the file,
    else from a thread here; hashlib lets go of the GIL while it hashes a
    block, so the event loop keeps sending meanwhile. `abandon` must be
    awaited before the source is closed: the thread reads through the
    source's descriptor.
    """

    def __init__(self, source: ChunkSource | None, digest: str | None) -> None:
        self._source = source
        self._digest = digest
        self._stop = threading.Event()
        self._work: asyncio.Future[str] | None = None
        self._on_our_thread = False

    @classmethod
    def start(
        cls, source: ChunkSource, early: concurrent.futures.Future[str] | None
    ) -> PendingSha256:
        """Begin working out the SHA-256 of `source` (inside a running loop)."""
        if early is None and source.size <= WHOLE_FILE_BYTES:
            # Hashing a quarter of a MiB costs less than a thread hop.
            return cls(source, sha256_of(source))
        pending = cls(source, None)
        pending._follow(
            asyncio.wrap_future(early) if early is not None else pending._on_thread()
        )
        return pending

    def known(self) -> str | None:
        """The digest if it is done, without waiting for it."""
        return self._digest

    async def result(self) -> str:
        if self._digest is not None:
            return self._digest
        assert self._work is not None
        try:
            return await asyncio.shield(self._work)
        except OSError:
            if self._stop.is_set():
                raise
        # The early hash could not read the file: whatever it met, the
        # reads here meet too, and say so in the send's error.
        self._follow(self._on_thread())
        return await asyncio.shield(self._work)

    async def abandon(self) -> None:
        """Stop a hash of ours; the child's reads through a descriptor of its
        own, and is not waited for."""
        self._stop.set()
        if self._work is None or not self._on_our_thread:
            return
        await asyncio.wait([self._work])
        if not self._work.cancelled():
            # Looked at, so that asyncio does not report it as never retrieved.
            self._work.exception()

    def _on_thread(self) -> asyncio.Future[str]:
        assert self._source is not None, "a digest known beforehand needs no hashing"
        self._on_our_thread = True
        return asyncio.ensure_future(
            asyncio.to_thread(sha256_of, self._source, self._stop)
        )

    def _follow(self, work: asyncio.Future[str]) -> None:
        self._work = work
        work.add_done_callback(self._keep)

    def _keep(self, work: asyncio.Future[str]) -> None:
        if not work.cancelled() and work.exception() is None:
            self._digest = work.result()
