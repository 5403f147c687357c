"""The work any pipeline of this shape must add to the bare client's, timed.

Beyond what the bare client and its broker do, datahaul must at least: read
the file twice on the robot (once for its XXH128, the id and the end-to-end
check, once to send it), hash it in the center (the SHA-256 it is recorded
under; the XXH128 there costs a fourteenth of that), carry it over one more
TCP hop (robot to vehicle), and write it durably to the store. (Until
2026-12-04 the robot's first read was a SHA-256, 0.5-0.7 CPU seconds per
GiB more.) Each of these
is timed here on its own, with the cheapest calls Python has for it (no
HTTP, no AMQP, no framing), in CPU seconds of the thread that does it.

Added to the bare client's own CPU per byte and the broker's, both measured
in the same run, that is a floor for the pipeline's; the rate it allows
with every core busy is an upper bound for the pipeline's rate on this
machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from bench.registry import BenchmarkError, Figure, RunContext, benchmark
from bench.units import MB, GiB, MiB, size_name

BLOCK = 1 * MiB
# How much the worker stages between two fdatasyncs, at most, with its
# prefetch of 16 one-MiB messages.
SYNC_EVERY = 16 * MiB


@dataclass(frozen=True)
class Costs:
    """CPU seconds for the whole source, one step each."""

    read_and_hash: float
    read: float
    hash_in_memory: float
    tcp_hop: float
    durable_write: float
    write_mode: str

    @property
    def total(self) -> float:
        return (
            self.read_and_hash
            + self.read
            + self.hash_in_memory
            + self.tcp_hop
            + self.durable_write
        )

    def describe(self, size: int) -> str:
        per_gib = GiB / size
        steps = [
            ("read and XXH128 (the id)", self.read_and_hash),
            ("read again (the chunks)", self.read),
            ("SHA-256 in memory (the record)", self.hash_in_memory),
            ("one more TCP hop, both ends", self.tcp_hop),
            (f"the durable write ({self.write_mode})", self.durable_write),
        ]
        listed = ", ".join(f"{name} {seconds * per_gib:.2f}" for name, seconds in steps)
        return f"CPU seconds per GiB: {listed}"


@benchmark(
    "floor",
    "the least work the pipeline adds to the bare client, and the rate it allows",
    order=55,
)
async def pipeline_floor(context: RunContext) -> list[Figure]:
    source = context.source()
    costs = await asyncio.to_thread(measure, source.path, context.options.work_dir)
    extra = costs.total * GiB / source.size
    figures = [
        Figure(
            "floor/extra",
            "CPU the pipeline must add to the bare client's",
            extra,
            "cpu-s/GiB",
            f"{costs.describe(source.size)}; timed on {size_name(source.size)}, "
            "each in the thread doing it",
        )
    ]
    for chunk in context.options.chunk_sizes:
        figures.append(floor_rate(context, chunk, extra))
    return figures


def floor_rate(context: RunContext, chunk: int, extra: float) -> Figure:
    """The rate at which the floor's CPU per GiB fills every core.

    The broker's share is the lesser of what it spent per GiB under the
    bare client and under the pipeline in this run: how it is fed changes
    it (a backlog of unconfirmed messages costs it more).
    """
    queue_type = context.options.queue_type
    bare = context.cpu_per_gib.get(f"bare/{queue_type}/{chunk}")
    if bare is None:
        raise BenchmarkError(
            "the floor part needs the bare part's CPU figures from the same "
            "run: add bare to --parts"
        )
    brokers = {"the bare client": bare["broker"]}
    pipeline = context.cpu_per_gib.get(f"pipeline/{queue_type}/{chunk}")
    if pipeline is not None:
        brokers["the pipeline"] = pipeline["broker"]
    broker = min(brokers.values())
    per_gib = bare["client"] + broker + extra
    cores = os.cpu_count() or 1
    under = ", ".join(f"{seconds:.1f} under {who}" for who, seconds in brokers.items())
    return Figure(
        f"floor/video/{queue_type}/{chunk}",
        f"highest rate the floor allows, {size_name(chunk)} chunks",
        cores / per_gib * GiB / MB,
        "MB/s",
        f"{cores} cores all busy with {per_gib:.1f} CPU seconds per GiB: the "
        f"bare client's own {bare['client']:.1f}, the broker's {broker:.1f} "
        f"(the least of {under}) and the floor's {extra:.1f}",
    )


def measure(source: Path, work_dir: Path) -> Costs:
    size = source.stat().st_size
    read_and_hash = _thread_cpu(lambda: _read(source, xxhash.xxh3_128()))
    read = _thread_cpu(lambda: _read(source, None))
    hash_in_memory = _thread_cpu(lambda: _hash_blocks(size))
    tcp_hop = _tcp_hop_cpu(size)
    mode, durable_write = _durable_write_cpu(work_dir / "floor-write.bin", size)
    return Costs(read_and_hash, read, hash_in_memory, tcp_hop, durable_write, mode)


def _thread_cpu(work: Callable[[], None]) -> float:
    started = time.thread_time()
    work()
    return time.thread_time() - started


def _read(path: Path, hasher: xxhash.xxh3_128 | None) -> None:
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            if hasher is not None:
                hasher.update(view[:count])


def _hash_blocks(size: int) -> None:
    block = os.urandom(BLOCK)
    hasher = hashlib.sha256()
    for _ in range(size // BLOCK):
        hasher.update(block)


def _tcp_hop_cpu(size: int) -> float:
    """CPU of sending `size` bytes to another thread over loopback TCP."""
    listener = socket.create_server(("127.0.0.1", 0))
    spent: dict[str, float] = {}

    def receive() -> None:
        started = time.thread_time()
        connection, _ = listener.accept()
        buffer = bytearray(BLOCK)
        received = 0
        with connection:
            while received < size:
                count = connection.recv_into(buffer)
                if not count:
                    break
                received += count
        spent["receiver"] = time.thread_time() - started
        if received != size:
            spent["short"] = float(received)

    receiver = threading.Thread(target=receive, name="floor-receiver")
    receiver.start()
    block = memoryview(os.urandom(BLOCK))
    started = time.thread_time()
    with socket.create_connection(listener.getsockname()) as sender:
        sent = 0
        while sent < size:
            piece = block[: min(BLOCK, size - sent)]
            sender.sendall(piece)
            sent += len(piece)
    spent["sender"] = time.thread_time() - started
    receiver.join(timeout=120)
    listener.close()
    if "short" in spent or "receiver" not in spent:
        raise BenchmarkError("the TCP hop's receiver did not get every byte")
    return spent["sender"] + spent["receiver"]


def _durable_write_cpu(path: Path, size: int) -> tuple[str, float]:
    """CPU of writing `size` bytes durably, as the worker's staged image is."""
    buffer = mmap.mmap(-1, BLOCK)
    buffer.write(os.urandom(BLOCK))
    try:
        try:
            return "O_DIRECT", _timed_write(path, size, buffer, os.O_DIRECT)
        except OSError:
            # A filesystem without direct I/O refuses the open or the write.
            return "through the page cache", _timed_write(path, size, buffer, 0)
    finally:
        buffer.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _timed_write(path: Path, size: int, buffer: mmap.mmap, flags: int) -> float:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
    try:
        started = time.thread_time()
        written = 0
        while written < size:
            written += os.pwrite(descriptor, buffer, written)
            if written % SYNC_EVERY == 0:
                os.fdatasync(descriptor)
        os.fdatasync(descriptor)
        return time.thread_time() - started
    finally:
        os.close(descriptor)
