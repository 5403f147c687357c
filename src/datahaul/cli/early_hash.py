"""The digests of the files `datahaul send` names, worked out while it loads.

A send cannot begin before its file's XXH128 (its id, and the worker's
check) is known, and the program spends its first half second importing
modules, on one core. A child process forked before those imports reads
the named files on the other core meanwhile: first the XXH128 of each, so
that every file can start as soon as the program is ready, then, with
`--sha256`, the SHA-256 of each, which the file's last packet carries. A
thread would not do: the imports hold the GIL in long stretches, and a
hashing thread beside them lost half its speed.

`datahaul.cli.main` calls `start` before it imports anything heavy;
`datahaul send` hands `digests_for` to its Sender, which asks it before it
reads a file to hash it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import xxhash

# Smaller files are hashed when they are sent: the head start is too short
# to be worth a process.
EARLY_BYTES = 16 * 1024 * 1024
BLOCK_BYTES = 8 * 1024 * 1024
# What the child writes for a file it could not read to the end.
UNREADABLE = b"-"
XXH128_DIGITS = 32
SHA256_DIGITS = 64

# (device, inode, size, modification time): a file changed since it was
# hashed early does not match, and is hashed again when it is sent.
Identity = tuple[int, int, int, int]


@dataclass(frozen=True)
class EarlyDigests:
    """One file's two digests, each settled when the child has it."""

    xxh128: Future[str] = field(default_factory=Future)
    sha256: Future[str] = field(default_factory=Future)


_digests: dict[Identity, EarlyDigests] = {}


def start(names: Iterable[str], *, sha256: bool = False) -> None:
    """Begin hashing each name that is a large regular file; others are left.

    The SHA-256 of each is worked out too when `sha256` is set; otherwise
    its future fails at once, and the sender does without it.
    """
    files: list[tuple[str, os.stat_result]] = []
    for name in names:
        try:
            found = os.stat(name)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(found.st_mode) and found.st_size >= EARLY_BYTES:
            files.append((name, found))
    if not files or not hasattr(os, "fork"):
        return

    readable, writable = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(readable)
        _hash_in_child(
            writable, [(name, found.st_size) for name, found in files], parent, sha256
        )
    os.close(writable)

    wanted: list[EarlyDigests] = []
    for _, found in files:
        digests = EarlyDigests()
        _digests.setdefault(identity_of(found), digests)
        wanted.append(digests)
    # The child writes the lines in this order: every XXH128, then every
    # SHA-256 if asked for.
    lines = [(d.xxh128, XXH128_DIGITS) for d in wanted]
    if sha256:
        lines += [(d.sha256, SHA256_DIGITS) for d in wanted]
    else:
        for digests in wanted:
            digests.sha256.set_exception(OSError("the SHA-256 was not asked for"))
    threading.Thread(
        target=_collect, args=(child, readable, lines), name="early-hash", daemon=True
    ).start()


def digests_for(identity: Identity) -> EarlyDigests | None:
    """This file's early digests; None if they were not started."""
    return _digests.pop(identity, None)


def identity_of(found: os.stat_result) -> Identity:
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)


def _hash_in_child(
    writable: int, files: list[tuple[str, int]], parent: int, sha256: bool
) -> None:
    # Ctrl-C reaches the whole process group: the child just stops.
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    def wanted() -> bool:
        return os.getppid() == parent

    try:
        makers: list[Callable[[], _Digest]] = [xxhash.xxh3_128]
        if sha256:
            makers.append(hashlib.sha256)
        for make in makers:
            for name, size in files:
                try:
                    line = _digest_of(name, size, make(), wanted).encode()
                except OSError:
                    line = UNREADABLE
                os.write(writable, line + b"\n")
    finally:
        # Nothing of the parent's (atexit, buffered output) runs here.
        os._exit(0)


def _collect(child: int, readable: int, lines: list[tuple[Future[str], int]]) -> None:
    """Settle each future with its line from the child: a digest of `digits`
    hex digits, or anything else for a file the child could not read."""
    with os.fdopen(readable, "rb") as pipe:
        for future, digits in lines:
            line = pipe.readline().strip()
            if len(line) == digits:
                future.set_result(line.decode())
            else:
                future.set_exception(OSError("the early hash could not read the file"))
    os.waitpid(child, 0)


class _Digest(Protocol):
    def update(self, data: memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def _digest_of(
    name: str, size: int, digest: _Digest, wanted: Callable[[], bool]
) -> str:
    # Not the sender's hashing: importing datahaul.sender loads aiohttp,
    # which would cost the child the head start it is for. Only the size
    # seen at the start is hashed: a file that grew or shrank since has
    # another identity, and this digest is not used for it.
    block = bytearray(BLOCK_BYTES)
    view = memoryview(block)
    descriptor = os.open(name, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            if not wanted():
                raise OSError("the sender that asked for this hash is gone")
            read = os.preadv(
                descriptor, [view[: min(BLOCK_BYTES, size - offset)]], offset
            )
            if not read:
                raise OSError(f"{name} is shorter than the {size} bytes it had")
            digest.update(view[:read])
            offset += read
    finally:
        os.close(descriptor)
    return digest.hexdigest()
