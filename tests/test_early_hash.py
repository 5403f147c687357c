"""`datahaul send` hashes its large files in a child process while it loads."""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import Future
from pathlib import Path

import pytest

from datahaul.cli import early_hash
from datahaul.sender import Sender
from datahaul.sender.chunking import FileSource

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _large_file(path: Path, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(early_hash.EARLY_BYTES + 12_345))
    return path


def test_a_large_file_is_hashed_by_the_child(tmp_path: Path) -> None:
    """The digest handed over is the file's SHA-256; each is handed over once."""
    video = _large_file(tmp_path / "clip.mp4", 1)
    identity = early_hash.identity_of(video.stat())

    early_hash.start([str(video), "--chunk-size", "1M", str(tmp_path / "missing")])
    future = early_hash.digest_for(identity)

    assert future is not None
    assert future.result(timeout=30) == hashlib.sha256(video.read_bytes()).hexdigest()
    assert early_hash.digest_for(identity) is None


def test_small_files_and_changed_files_get_no_early_digest(tmp_path: Path) -> None:
    """Below EARLY_BYTES nothing starts; a file touched since the start has
    another identity, so its old digest cannot be taken for the new bytes."""
    small = tmp_path / "notes.txt"
    small.write_text("hello\n")
    video = _large_file(tmp_path / "clip.mp4", 2)
    before = early_hash.identity_of(video.stat())

    early_hash.start([str(small), str(video)])
    os.utime(video, ns=(before[3] + 10**9, before[3] + 10**9))

    assert early_hash.digest_for(early_hash.identity_of(small.stat())) is None
    assert early_hash.digest_for(early_hash.identity_of(video.stat())) is None
    stale = early_hash.digest_for(before)
    assert stale is not None
    stale.result(timeout=30)


def test_a_file_shorter_than_it_was_is_not_hashed(tmp_path: Path) -> None:
    """The child hashes the size seen at the start, or nothing."""
    video = _large_file(tmp_path / "clip.mp4", 3)
    size = video.stat().st_size

    with pytest.raises(OSError, match="shorter"):
        early_hash._sha256_of(str(video), size + 1, lambda: True)
    with pytest.raises(OSError, match="gone"):
        early_hash._sha256_of(str(video), size, lambda: False)


def test_what_the_child_could_not_hash_fails_its_future() -> None:
    """A line the child marks unreadable, or no line at all (it died), fails
    the file's future instead of leaving its sender waiting."""
    readable, writable = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writable, early_hash.UNREADABLE + b"\n")
        os._exit(0)
    os.close(writable)
    futures: list[Future[str]] = [Future(), Future()]

    early_hash._collect(child, readable, futures)

    for future in futures:
        with pytest.raises(OSError, match="could not read"):
            future.result(timeout=5)


async def test_the_sender_hashes_the_file_itself_when_the_early_hash_failed(
    tmp_path: Path,
) -> None:
    """A failed early digest is not an error: the Sender reads the file."""
    video = _large_file(tmp_path / "clip.mp4", 4)
    failed: Future[str] = Future()
    failed.set_exception(OSError("the early hash could not read the file"))
    done: Future[str] = Future()
    done.set_result("ab" * 32)
    source = FileSource(video)
    try:
        gone = Sender("http://127.0.0.1:9", known_sha256=lambda _: failed)
        known = Sender("http://127.0.0.1:9", known_sha256=lambda _: done)
        assert await gone._sha256_known(source) is None
        assert await known._sha256_known(source) == "ab" * 32
    finally:
        source.close()
