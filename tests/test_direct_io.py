"""The staged image's writer: page-aligned pieces around the page cache."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from pathlib import Path

import pytest

from datahaul.storage.blobs import FilesystemStore
from datahaul.storage.direct import ALIGNMENT, BUFFER_BYTES, DirectWriter

pytestmark = pytest.mark.skipif(
    not hasattr(os, "O_DIRECT"), reason="this platform has no O_DIRECT"
)


def _pieces(seed: int) -> tuple[list[tuple[int, bytes]], bytearray]:
    """Chunks of a file in shuffled order, with a gap, a short tail and one
    larger than the writer's buffer; and the file they should make."""
    rng = random.Random(seed)
    chunk = 64 * 1024
    lengths = [chunk] * 6 + [BUFFER_BYTES + 2 * ALIGNMENT] + [chunk] * 3 + [1234]
    pieces, offset = [], 0
    for index, length in enumerate(lengths):
        if index != 4:  # seq 5 has not come yet: a hole the file keeps
            pieces.append((offset, rng.randbytes(length)))
        offset += length
    expected = bytearray(offset)
    for at, data in pieces:
        expected[at : at + len(data)] = data
    rng.shuffle(pieces)
    return pieces, expected


def test_aligned_and_unaligned_pieces_land_where_they_belong(tmp_path: Path) -> None:
    """Out of order, with gaps, a tail that is not page-sized and a piece
    larger than the buffer: the file holds every byte at its offset."""
    pieces, expected = _pieces(1)
    writer = DirectWriter()
    target = tmp_path / "image"

    writer.write(target, pieces)

    assert writer.enabled
    assert target.read_bytes() == bytes(expected)


def test_a_later_write_keeps_what_the_file_held(tmp_path: Path) -> None:
    """Images are filled in over many batches: nothing earlier is truncated,
    and each write says whether it created the file."""
    pieces, expected = _pieces(2)
    target = tmp_path / "image"
    writer = DirectWriter()

    created = [writer.write(target, [piece]) for piece in pieces]

    assert target.read_bytes() == bytes(expected)
    # Only the first write made the file, so only it needs the folder synced.
    assert created == [True] + [False] * (len(pieces) - 1)


def test_direct_writes_leave_the_page_cache_alone(tmp_path: Path) -> None:
    """The point of it: an image written directly is not in the page cache
    afterwards, where one written through it is."""
    data = random.Random(3).randbytes(8 * BUFFER_BYTES)
    pages = len(data) // mmap.PAGESIZE
    direct_file, cached_file = tmp_path / "direct", tmp_path / "cached"

    DirectWriter().write(direct_file, [(0, data)])
    cached_file.write_bytes(data)

    assert _pages_in_cache(direct_file) < pages // 10
    assert _pages_in_cache(cached_file) > pages // 2
    assert direct_file.read_bytes() == data


class _MisalignedBuffer(DirectWriter):
    """A buffer one byte off its page: the kernel refuses such direct writes."""

    def _buffer(self) -> memoryview:
        return memoryview(mmap.mmap(-1, BUFFER_BYTES + ALIGNMENT))[1 : BUFFER_BYTES + 1]


def test_a_refused_direct_write_falls_back_once_and_for_good(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the kernel says EINVAL, the bytes go through the page cache, the
    writer says so once, and later writes do not try again."""
    pieces, expected = _pieces(4)
    writer = _MisalignedBuffer()

    writer.write(tmp_path / "first", pieces)
    writer.write(tmp_path / "second", pieces)

    assert not writer.enabled
    assert (tmp_path / "first").read_bytes() == bytes(expected)
    assert (tmp_path / "second").read_bytes() == bytes(expected)
    assert capsys.readouterr().out.count("staging.direct_io_off") == 1


def test_the_filesystem_store_writes_images_through_it(tmp_path: Path) -> None:
    """FilesystemStore.write_at is the writer's way in; keys are checked."""
    store = FilesystemStore(tmp_path)
    pieces, expected = _pieces(5)

    store.write_at("file-1/image", pieces)

    assert store.read("file-1/image") == bytes(expected)
    assert store._direct.enabled


def _pages_in_cache(path: Path) -> int:
    """mincore(2) over a shared mapping of the file: its pages in memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    descriptor = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, descriptor, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(address, size, vector) == 0, ctypes.get_errno()
        finally:
            libc.munmap(address, size)
    finally:
        os.close(descriptor)
    return sum(byte & 1 for byte in vector)
