"""Writes that go around the page cache (O_DIRECT), for a file's staged image.

A staged image is written once, hashed from the bytes still in memory and
linked as the blob; only a chunk that came before its turn is read back,
once. Through the page cache
every page of it costs the kernel a page allocation and a copy: in the
benchmark's VM most of the worker's system time. Written directly, the
disk takes the bytes from one aligned buffer.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterable

import structlog

log = structlog.get_logger("datahaul.storage")

# Direct I/O wants offsets, lengths and memory aligned to the device's
# logical block; a page satisfies every device met in practice.
ALIGNMENT = 4096
# Pieces are gathered into writes of up to this size.
BUFFER_BYTES = 4 * 1024 * 1024

Piece = tuple[int, bytes | memoryview]


class DirectWriter:
    """Writes (offset, bytes) pieces into files, the page-aligned ones directly.

    Pieces that are not page-aligned (a file's last chunk, odd chunk sizes)
    go through the page cache. Where the filesystem refuses O_DIRECT
    (tmpfs on older kernels, some network filesystems) the writer says so
    once and writes everything through the page cache from then on.
    """

    def __init__(self) -> None:
        self.enabled = hasattr(os, "O_DIRECT")
        self._local = threading.local()

    def write(self, path: os.PathLike[str] | str, pieces: Iterable[Piece]) -> bool:
        """Write every piece at its offset and fdatasync the file; say whether
        the file was created here."""
        aligned: list[Piece] = []
        others: list[Piece] = []
        for offset, data in pieces:
            fits = offset % ALIGNMENT == 0 and len(data) % ALIGNMENT == 0
            (aligned if fits and self.enabled and data else others).append(
                (offset, data)
            )

        created = True
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            descriptor, created = os.open(path, os.O_WRONLY), False
        try:
            if aligned and not self._write_direct(path, aligned):
                others.extend(aligned)
            for offset, data in others:
                _pwrite_all(descriptor, data, offset)
            # One fdatasync covers what both descriptors wrote: it is the
            # file's data and size that it makes durable.
            os.fdatasync(descriptor)
        finally:
            os.close(descriptor)
        return created

    def _write_direct(self, path: os.PathLike[str] | str, pieces: list[Piece]) -> bool:
        """Write the pieces with O_DIRECT; False if they must go another way."""
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as error:
            return self._refused(path, error)
        try:
            for offset, run in self._runs(pieces):
                written = os.pwrite(descriptor, run, offset)
                if written != len(run):
                    # A short direct write leaves an unaligned rest; writing
                    # every piece again through the page cache is simpler
                    # and puts the same bytes in the same places.
                    return False
            return True
        except OSError as error:
            return self._refused(path, error)
        finally:
            os.close(descriptor)

    def _runs(self, pieces: list[Piece]) -> Iterable[tuple[int, memoryview]]:
        """Consecutive pieces copied into the aligned buffer, a buffer at a time."""
        buffer = self._buffer()
        start = filled = 0
        for offset, data in sorted(pieces, key=lambda piece: piece[0]):
            if filled and offset != start + filled:
                yield start, buffer[:filled]
                filled = 0
            view = memoryview(data)
            while view:
                if not filled:
                    start = offset
                take = min(len(view), len(buffer) - filled)
                buffer[filled : filled + take] = view[:take]
                filled, offset, view = filled + take, offset + take, view[take:]
                if filled == len(buffer):
                    yield start, buffer[:filled]
                    filled = 0
        if filled:
            yield start, buffer[:filled]

    def _buffer(self) -> memoryview:
        # One buffer per thread: the staging threads write at the same time.
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = memoryview(mmap.mmap(-1, BUFFER_BYTES))
            self._local.buffer = buffer
        return buffer

    def _refused(self, path: os.PathLike[str] | str, error: OSError) -> bool:
        if error.errno != errno.EINVAL:
            raise error
        if self.enabled:
            self.enabled = False
            log.info(
                "staging.direct_io_off",
                path=str(path),
                reason=os.strerror(error.errno),
            )
        return False


def _pwrite_all(descriptor: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(descriptor, view, offset)
        view, offset = view[written:], offset + written
