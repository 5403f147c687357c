"""Each benchmark is one async function, registered under a name.

A benchmark receives the run's context and returns the figures it measured.
Figures are keyed so that the report can pair a pipeline figure with the
ceiling measured in the same run (see bench.report.comparisons).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bench.units import GiB, KiB, MiB, size_name
from datahaul.errors import DatahaulError

log = structlog.get_logger("datahaul.bench")


class BenchmarkError(DatahaulError):
    """Raised when a benchmark cannot run or its result does not check out."""


@dataclass(frozen=True)
class Options:
    """What the command line chose: sizes, queue type, servers, places."""

    file_size: int
    chunk_sizes: list[int]
    queue_type: str
    small_size: int
    small_count: int
    publish_sizes: list[int]
    window: int
    prefetch: int
    amqp_url: str
    nats_url: str
    nats_chunk: int
    work_dir: Path
    timeout: float
    small_per_file: int = 100
    outbox_size: int = 256 * MiB
    outbox_chunk: int = 256 * KiB
    latency_count: int = 2000
    latency_seconds: float = 20.0
    latency_rate: float | None = None


@dataclass(frozen=True)
class Figure:
    """One measured number, with what it is and how it was obtained."""

    key: str
    label: str
    value: float
    unit: str
    detail: str = ""


@dataclass(frozen=True)
class SourceFile:
    """The random 'video' every large-file benchmark moves, and its digest."""

    path: Path
    size: int
    sha256: str


@dataclass
class RunContext:
    """Shared by the benchmarks of one run: the options and the source file."""

    options: Options
    figures: list[Figure] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)
    loads: dict[str, float] = field(default_factory=dict)
    # CPU seconds per GiB moved, by run ("bare/quorum/262144") and process.
    cpu_per_gib: dict[str, dict[str, float]] = field(default_factory=dict)
    _source: SourceFile | None = None

    def source(self) -> SourceFile:
        """The source file, written on first use so that all parts share it."""
        if self._source is None:
            self._source = write_random_file(
                self.options.work_dir / "source.video", self.options.file_size
            )
        return self._source

    def figure(self, key: str) -> Figure | None:
        return next((f for f in self.figures if f.key == key), None)

    def note_cpu(self, run: str, used: dict[str, float], payload_bytes: int) -> None:
        """Keep a run's CPU per process for parts that come after it."""
        self.cpu_per_gib[run] = {
            name: seconds * GiB / payload_bytes for name, seconds in used.items()
        }


Benchmark = Callable[[RunContext], Awaitable[list[Figure]]]


@dataclass(frozen=True)
class Part:
    name: str
    description: str
    order: int
    run: Benchmark


REGISTRY: dict[str, Part] = {}


def benchmark(
    name: str, description: str, order: int
) -> Callable[[Benchmark], Benchmark]:
    """Register a benchmark under `name`; parts run by ascending `order`."""

    def register(function: Benchmark) -> Benchmark:
        if name in REGISTRY:
            raise BenchmarkError(f"two benchmarks are registered as {name!r}")
        REGISTRY[name] = Part(name, description, order, function)
        return function

    return register


def parts() -> list[Part]:
    """Every registered part, ceilings before the pipeline that uses them."""
    return sorted(REGISTRY.values(), key=lambda part: part.order)


def write_random_file(path: Path, size: int) -> SourceFile:
    """Incompressible bytes, like encoded video; hashed as they are written."""
    digest = hashlib.sha256()
    block = 4 * MiB
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        remaining = size
        while remaining:
            data = os.urandom(min(block, remaining))
            digest.update(data)
            out.write(data)
            remaining -= len(data)
        # On disk before any part starts, so that no part's disk figures
        # count the writeback of its own source.
        out.flush()
        os.fsync(out.fileno())
    log.info("bench.source_written", path=str(path), size=size_name(size))
    return SourceFile(path, size, digest.hexdigest())
