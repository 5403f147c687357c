"""The disk's rate for durable writes, as a reference for the transfers.

A quorum queue fsyncs what it confirms, and a worker fsyncs what it stages
before it acks, so on one disk the broker and the workers share it. It is
not a hard ceiling: how much a write pattern gets out of the disk depends
on how much it writes per fsync, and 8 MiB blocks are one such pattern.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bench.procs import device_of
from bench.registry import Figure, RunContext, benchmark
from bench.units import GiB, MiB, mb_per_s, size_name

BLOCK = 8 * MiB
LARGEST = 1 * GiB
BROKER_DIR = Path("/var/lib/rabbitmq")


@benchmark(
    "disk",
    "sequential writes, each 8 MiB block fdatasync'ed (the disk's durable rate)",
    order=5,
)
async def disk_rate(context: RunContext) -> list[Figure]:
    size = min(context.options.file_size, LARGEST)
    return [await asyncio.to_thread(measure, context.options.work_dir, size)]


def measure(work_dir: Path, size: int) -> Figure:
    seconds = timed_durable_write(work_dir / "disk-rate.bin", size)
    device = device_of(work_dir) or "unknown device"
    shared = device_of(BROKER_DIR) == device
    detail = (
        f"{size_name(size)} in {size_name(BLOCK)} blocks, fdatasync after each, "
        f"in {seconds:.2f} s on {device}"
        + (f", the device that also holds {BROKER_DIR}" if shared else "")
    )
    return Figure(
        "disk/write",
        "disk, durable sequential writes",
        mb_per_s(size, seconds),
        "MB/s",
        detail,
    )


def timed_durable_write(path: Path, size: int) -> float:
    """Seconds to write `size` random bytes durably; the file is removed."""
    block = os.urandom(BLOCK)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        written = 0
        while written < size:
            written += os.write(descriptor, block[: size - written])
            os.fdatasync(descriptor)
        return time.perf_counter() - started
    finally:
        os.close(descriptor)
        os.unlink(path)
