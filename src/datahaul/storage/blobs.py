"""Blob stores: where assembled images and video land, and where chunks wait.

Every store speaks the same small interface, so that the workers neither
know nor care whether bytes go to a directory (a NAS, the embedded default)
or to an S3 bucket.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, cast
from urllib.parse import urlsplit

from datahaul.errors import ConfigError, StorageError
from datahaul.storage.direct import DirectWriter

READ_BLOCK = 1024 * 1024
# How much of a stream is written before its writeback is started.
WRITEBACK_BYTES = 32 * 1024 * 1024


class BlobStore(Protocol):
    """Keys are '/'-separated relative paths; writes are atomic and idempotent."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store small bytes durably under key, replacing what was there."""

    def put_stream(
        self, key: str, blocks: Iterable[bytes], sha256: str | None = None
    ) -> str:
        """Store a stream durably under key; return its location (a URL).

        `sha256`, when the caller knows it beforehand, lets a store that keeps
        checksums (S3) record it and refuse other bytes with IntegrityError;
        the caller checks the digest itself either way.
        """

    def read(self, key: str) -> bytes:
        """The whole of a (small) object."""

    def open_range(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        """Bytes [start, end) of an object, in blocks of bounded size."""

    def size(self, key: str) -> int:
        """The object's size in bytes; StorageError when missing."""

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under prefix; nothing there is not an error."""

    def list_prefixes(self, prefix: str) -> list[str]:
        """The names of the 'folders' directly under prefix."""

    def list_names(self, prefix: str) -> list[str]:
        """The names of the objects directly under prefix."""

    def delete_keys(self, keys: Iterable[str]) -> None:
        """Remove these objects; one that is not there is not an error."""

    def sync(self, keys: Iterable[str]) -> None:
        """Make earlier `put`s of these keys durable (a no-op where they are)."""


class FilesystemStore:
    """A directory tree: temporary file, fsync, rename, fsync the directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self._direct = DirectWriter()

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} escapes the store at {self.root}")
        return path

    def put(self, key: str, data: bytes) -> None:
        self._write(key, [data], sync_dir=False)

    def put_stream(
        self, key: str, blocks: Iterable[bytes], sha256: str | None = None
    ) -> str:
        return self._write(key, blocks, sync_dir=True).as_uri()

    def _write(self, key: str, blocks: Iterable[bytes], *, sync_dir: bool) -> Path:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "wb") as handle:
                written = handed = 0
                for block in blocks:
                    handle.write(block)
                    written += len(block)
                    if written - handed >= WRITEBACK_BYTES:
                        handle.flush()
                        _start_writeback(handle.fileno(), handed, written - handed)
                        handed = written
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise
        if sync_dir:
            _fsync_dir(target.parent)
        return target

    def write_at(self, key: str, pieces: Iterable[tuple[int, bytes]]) -> None:
        """Write each (offset, bytes) piece into an object, durably.

        The object is created if need be and never truncated: what other
        places of it hold stays as it was. Its folder is fsynced only when
        the object was created here: later writes change no directory.
        """
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if self._direct.write(target, pieces):
            _fsync_dir(target.parent)

    def adopt(self, key: str, source: Path) -> str:
        """Make a file of the same filesystem the object under key, uncopied.

        The file is linked, not moved: its old name stays valid until its
        owner deletes it, so an adoption interrupted half-way can be redone.
        OSError (EXDEV across filesystems) means the caller must copy.
        """
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        os.link(source, temporary)
        try:
            os.replace(temporary, target)
        finally:
            # Still there when target already was this file: rename then
            # leaves both names in place.
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        _fsync_dir(target.parent)
        return target.as_uri()

    def sync(self, keys: Iterable[str]) -> None:
        # Each put already fsynced its file; the renames need their folders.
        for folder in {self.path(key).parent for key in keys}:
            _fsync_dir(folder)

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"no object {key!r} in {self.root}") from None

    def open_range(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        path = self.path(key)
        if not path.is_file():
            raise StorageError(f"no object {key!r} in {self.root}")
        with open(path, "rb") as handle:
            handle.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                want = READ_BLOCK if remaining is None else min(READ_BLOCK, remaining)
                block = handle.read(want)
                if not block:
                    return
                if remaining is not None:
                    remaining -= len(block)
                yield block

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"no object {key!r} in {self.root}") from None

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def list_prefixes(self, prefix: str) -> list[str]:
        folder = self.path(prefix) if prefix else self.root
        if not folder.is_dir():
            return []
        return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())

    def list_names(self, prefix: str) -> list[str]:
        folder = self.path(prefix)
        try:
            return sorted(entry.name for entry in folder.iterdir() if entry.is_file())
        except FileNotFoundError:
            return []

    def delete_keys(self, keys: Iterable[str]) -> None:
        folders = set()
        for key in keys:
            path = self.path(key)
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in folders - {self.root}:
            # Only an empty folder goes; a writer that lost the race to
            # this rmdir fails its write, and its batch is tried again.
            with contextlib.suppress(OSError):
                folder.rmdir()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(descriptor: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk, without waiting.

    A large blob otherwise sits in the page cache until its final fsync,
    which then waits for all of it at once; started as it goes, the disk
    writes while the file is still being copied and hashed. Linux only;
    elsewhere the final fsync does all the work, as before.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(descriptor, offset, length, SYNC_FILE_RANGE_WRITE)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def open_store(url: str) -> BlobStore:
    """The store a URL names: file:///PATH, or s3://BUCKET/PREFIX?... (see s3.py)."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        # Imported here: boto3 takes a while to load, and only S3 users need it.
        from datahaul.storage.s3 import S3Store

        return S3Store.open(url)
    if parts.scheme == "file":
        if not parts.path:
            raise ConfigError(f"blob store URL {url!r} names no directory")
        return FilesystemStore(Path(parts.path))
    if parts.scheme == "" and url:
        return FilesystemStore(Path(url))
    raise ConfigError(
        f"blob store URL {url!r}: use file:///PATH or s3://BUCKET/PREFIX?endpoint=..."
    )
