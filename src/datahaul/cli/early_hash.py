"""The SHA-256 of the files `datahaul send` names, worked out while it loads.

A send cannot begin before its file's SHA-256 (the file id) is known, and
the program spends its first half second importing modules, on one core.
A child process forked before those imports hashes the named files on the
other core meanwhile. A thread would not do: the imports hold the GIL in
long stretches, and a hashing thread beside them lost half its speed.

`datahaul.cli.main` calls `start` before it imports anything heavy;
`datahaul send` hands `digest_for` to its Sender, which asks it before it
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

# Smaller files are hashed when they are sent: the head start is too short
# to be worth a process.
EARLY_BYTES = 16 * 1024 * 1024
BLOCK_BYTES = 8 * 1024 * 1024
# What the child writes for a file it could not read to the end.
UNREADABLE = b"-"

# (device, inode, size, modification time): a file changed since it was
# hashed early does not match, and is hashed again when it is sent.
Identity = tuple[int, int, int, int]

_digests: dict[Identity, Future[str]] = {}


def start(names: Iterable[str]) -> None:
    """Begin hashing each name that is a large regular file; others are left."""
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
            writable, [(name, found.st_size) for name, found in files], parent
        )
    os.close(writable)

    futures: list[Future[str]] = []
    for _, found in files:
        future: Future[str] = Future()
        _digests.setdefault(identity_of(found), future)
        futures.append(future)
    threading.Thread(
        target=_collect, args=(child, readable, futures), name="early-hash", daemon=True
    ).start()


def digest_for(identity: Identity) -> Future[str] | None:
    """The future of this file's early SHA-256; None if it was not started."""
    return _digests.pop(identity, None)


def identity_of(found: os.stat_result) -> Identity:
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)


def _hash_in_child(writable: int, files: list[tuple[str, int]], parent: int) -> None:
    # Ctrl-C reaches the whole process group: the child just stops.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        for name, size in files:
            try:
                line = _sha256_of(name, size, lambda: os.getppid() == parent).encode()
            except OSError:
                line = UNREADABLE
            os.write(writable, line + b"\n")
    finally:
        # Nothing of the parent's (atexit, buffered output) runs here.
        os._exit(0)


def _collect(child: int, readable: int, futures: list[Future[str]]) -> None:
    with os.fdopen(readable, "rb") as pipe:
        for future in futures:
            line = pipe.readline().strip()
            if len(line) == hashlib.sha256().digest_size * 2:
                future.set_result(line.decode())
            else:
                future.set_exception(OSError("the early hash could not read the file"))
    os.waitpid(child, 0)


def _sha256_of(name: str, size: int, wanted: Callable[[], bool]) -> str:
    # Not the sender's sha256_of: importing datahaul.sender loads aiohttp,
    # which would cost the child the head start it is for. Only the size
    # seen at the start is hashed: a file that grew or shrank since has
    # another identity, and this digest is not used for it.
    digest = hashlib.sha256()
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
