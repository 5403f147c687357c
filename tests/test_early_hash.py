"""`datahaul send` hashes its large files in a child process while it loads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from pathlib import Path

import pytest
import xxhash

from datahaul.cli import early_hash
from datahaul.sender import Sender
from datahaul.sender.chunking import FileSource, PendingSha256

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _large_file(path: Path, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(early_hash.EARLY_BYTES + 12_345))
    return path


def test_large_files_are_hashed_by_the_child(tmp_path: Path) -> None:
    """The digests handed over are each file's XXH128 and, asked for, its
    SHA-256; each file's are handed over once."""
    videos = [_large_file(tmp_path / f"clip-{n}.mp4", n) for n in (1, 2)]
    identities = [early_hash.identity_of(video.stat()) for video in videos]

    early_hash.start(
        [
            str(videos[0]),
            "--chunk-size",
            "1M",
            str(tmp_path / "missing"),
            str(videos[1]),
        ],
        sha256=True,
    )

    for video, identity in zip(videos, identities, strict=True):
        digests = early_hash.digests_for(identity)
        assert digests is not None
        content = video.read_bytes()
        assert digests.xxh128.result(timeout=30) == xxhash.xxh3_128_hexdigest(content)
        assert digests.sha256.result(timeout=30) == hashlib.sha256(content).hexdigest()
        assert early_hash.digests_for(identity) is None


def test_small_files_and_changed_files_get_no_early_digest(tmp_path: Path) -> None:
    """Below EARLY_BYTES nothing starts; a file touched since the start has
    another identity, so its old digest cannot be taken for the new bytes."""
    small = tmp_path / "notes.txt"
    small.write_text("hello\n")
    video = _large_file(tmp_path / "clip.mp4", 2)
    before = early_hash.identity_of(video.stat())

    early_hash.start([str(small), str(video)], sha256=True)
    os.utime(video, ns=(before[3] + 10**9, before[3] + 10**9))

    assert early_hash.digests_for(early_hash.identity_of(small.stat())) is None
    assert early_hash.digests_for(early_hash.identity_of(video.stat())) is None
    stale = early_hash.digests_for(before)
    assert stale is not None
    stale.sha256.result(timeout=30)


def test_a_file_shorter_than_it_was_is_not_hashed(tmp_path: Path) -> None:
    """The child hashes the size seen at the start, or nothing."""
    video = _large_file(tmp_path / "clip.mp4", 3)
    size = video.stat().st_size

    with pytest.raises(OSError, match="shorter"):
        early_hash._digest_of(str(video), size + 1, hashlib.sha256(), lambda: True)
    with pytest.raises(OSError, match="gone"):
        early_hash._digest_of(str(video), size, hashlib.sha256(), lambda: False)


def test_without_sha256_only_the_xxh128_is_worked_out(tmp_path: Path) -> None:
    """Unless asked, the child hashes each file once, and the SHA-256's
    future fails at once, so that nobody waits for it."""
    video = _large_file(tmp_path / "clip.mp4", 5)

    early_hash.start([str(video)])

    digests = early_hash.digests_for(early_hash.identity_of(video.stat()))
    assert digests is not None
    assert digests.xxh128.result(timeout=30) == xxhash.xxh3_128_hexdigest(
        video.read_bytes()
    )
    with pytest.raises(OSError, match="not asked for"):
        digests.sha256.result(timeout=0)


def test_what_the_child_could_not_hash_fails_its_futures() -> None:
    """A line the child marks unreadable, or no line at all (it died), fails
    the file's futures instead of leaving its sender waiting."""
    readable, writable = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writable, early_hash.UNREADABLE + b"\n")
        os._exit(0)
    os.close(writable)
    wanted = [early_hash.EarlyDigests(), early_hash.EarlyDigests()]

    lines = [
        (future, digits)
        for digests in wanted
        for future, digits in (
            (digests.xxh128, early_hash.XXH128_DIGITS),
            (digests.sha256, early_hash.SHA256_DIGITS),
        )
    ]
    early_hash._collect(child, readable, lines)

    for digests in wanted:
        for future in (digests.xxh128, digests.sha256):
            with pytest.raises(OSError, match="could not read"):
                future.result(timeout=5)


async def test_the_sender_hashes_the_file_itself_when_the_early_hash_failed(
    tmp_path: Path,
) -> None:
    """A failed early digest is not an error: the Sender reads the file; a
    digest the child found is taken as it is."""
    video = _large_file(tmp_path / "clip.mp4", 4)
    content = video.read_bytes()
    failed = early_hash.EarlyDigests()
    for future in (failed.xxh128, failed.sha256):
        future.set_exception(OSError("the early hash could not read the file"))
    done = early_hash.EarlyDigests()
    done.xxh128.set_result("ab" * 16)
    done.sha256.set_result("cd" * 32)
    source = FileSource(video)
    sender = Sender("http://127.0.0.1:9")
    try:
        assert await sender._content_id(source, failed) == xxhash.xxh3_128_hexdigest(
            content
        )
        assert await sender._content_id(source, done) == "ab" * 16
        for digests, expected in (
            (failed, hashlib.sha256(content).hexdigest()),
            (done, "cd" * 32),
        ):
            pending = PendingSha256.start(source, digests.sha256)
            try:
                assert await pending.result() == expected
                assert pending.known() == expected
            finally:
                await pending.abandon()
    finally:
        source.close()


async def test_an_abandoned_sha256_waits_only_for_a_thread_of_its_own(
    tmp_path: Path,
) -> None:
    """A send that ends early waits for its own hashing thread, which reads
    through the source's descriptor, but not for the early hash's child,
    which reads through one of its own."""
    video = _large_file(tmp_path / "clip.mp4", 6)
    source = FileSource(video)
    try:
        never_done = early_hash.EarlyDigests().sha256
        from_child = PendingSha256.start(source, never_done)
        async with asyncio.timeout(1):
            await from_child.abandon()

        on_thread = PendingSha256.start(source, None)
        await on_thread.abandon()
        assert on_thread.known() is None
    finally:
        source.close()
