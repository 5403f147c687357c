"""Small text packets end to end: many-file throughput, and latency at half of it.

Both parts run the real sender (bench.drive, in its own process) against a
`datahaul gateway` and a `datahaul worker --type text` in a fresh vhost and
data directory, and stop their clocks on the worker's `file.stored.text`
events, to which the harness subscribes before anything is sent.

- `small`: 1 KiB packets in many small text files, all sent at once in
  batches; packets per second from the first file's hashing to the last
  file's event, against the bare client's 1 KiB ceiling.
- `latency`: one-packet files. A burst of them gives the highest rate at
  which such files are stored; then files are started at a steady half of
  that rate, and each one's time from its 2xx to its event is taken.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.drive import Driver, DriveRun, driver
from bench.pipeline import (
    Service,
    StoredEvents,
    free_port,
    services,
    status_of,
    stored_events,
    unless_broken,
    verify,
    wait_ready,
)
from bench.procs import CpuMeter, PeakSampler, broker_process, collector_paused
from bench.rabbit import fresh_vhost
from bench.registry import (
    BenchmarkError,
    Figure,
    RunContext,
    SourceFile,
    benchmark,
)
from bench.units import MB, flag_name, size_name
from datahaul.broker.topology import queue_for
from datahaul.sender import default_file_id

TEXT_STORED_KEY = "file.stored.text"


@dataclass(frozen=True)
class TextFile:
    path: Path
    file_id: str
    sha256: str
    size: int


def write_text_files(directory: Path, count: int, size: int) -> list[TextFile]:
    """`count` files of `size` random ASCII bytes each: distinct contents, ids."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(count):
        # base64 of random bytes: printable text that no two files share.
        text = base64.b64encode(os.urandom(math.ceil(size * 3 / 4)))[:size]
        sha256 = hashlib.sha256(text).hexdigest()
        path = directory / f"log-{index:06d}.txt"
        path.write_bytes(text)
        files.append(TextFile(path, default_file_id(text), sha256, size))
    return files


@dataclass
class TextPipeline:
    """A gateway and a text worker, running, with the stored events heard."""

    gateway: Service
    worker: Service
    gateway_url: str
    env: dict[str, str]
    events: StoredEvents

    @property
    def services(self) -> list[Service]:
        return [self.gateway, self.worker]


@contextlib.asynccontextmanager
async def text_pipeline(
    context: RunContext, purpose: str
) -> AsyncIterator[TextPipeline]:
    options = context.options
    data_dir = options.work_dir / f"{purpose}-data"
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    async with fresh_vhost(options.amqp_url, purpose) as amqp_url:
        env = os.environ | {
            "DATAHAUL_AMQP_URL": amqp_url,
            "DATAHAUL_DATA_DIR": str(data_dir),
            "DATAHAUL_QUEUE_TYPE": options.queue_type,
        }
        async with services(env, port, data_dir, "text") as (gateway, worker):
            await wait_ready(gateway, worker, gateway_url, amqp_url, queue_for("text"))
            async with stored_events(amqp_url, TEXT_STORED_KEY) as events:
                yield TextPipeline(gateway, worker, gateway_url, env, events)


@dataclass(frozen=True)
class Delivered:
    """A send through the text pipeline: the sender's report, when the last
    file was stored, and where the CPU went meanwhile."""

    sent: DriveRun
    stored_at: float
    cores: str

    @property
    def seconds(self) -> float:
        """From the sender's go to the last file.stored event."""
        return self.stored_at - self.sent.started


async def send_and_store(
    pipe: TextPipeline,
    context: RunContext,
    files: Sequence[TextFile],
    mode: str = "burst",
    rate: float | None = None,
) -> Delivered:
    """Send the files with the real sender and wait until all are stored."""
    options = context.options
    async with driver(
        mode,
        [item.path for item in files],
        gateway_url=pipe.gateway_url,
        data_type="text",
        chunk=flag_name(options.small_size),
        work_dir=options.work_dir,
        timeout=options.timeout,
        rate=rate,
    ) as sender:
        meter = CpuMeter(busy_processes(pipe, sender), self_label="harness")
        with meter.measure(), collector_paused():
            await sender.go()
            sent = await unless_broken(sender.result(), pipe.events, pipe.services)
            check_ids(sent, files)
            expected = {item.file_id for item in files}
            stored_at = await stored_by(pipe, expected, options.timeout)
    check_events(pipe.events, files)
    return Delivered(sent, stored_at, meter.cores())


def busy_processes(pipe: TextPipeline, sender: Driver) -> dict[str, psutil.Process]:
    watched = {"sender": sender.process}
    watched |= {"gateway": pipe.gateway.watch(), "worker": pipe.worker.watch()}
    broker = broker_process()
    return watched | ({"broker": broker} if broker else {})


def check_ids(sent: DriveRun, files: Sequence[TextFile]) -> None:
    expected = {item.file_id for item in files}
    named = {str(item["file_id"]) for item in sent.files}
    if named != expected:
        raise BenchmarkError(
            f"the sender named {len(named - expected)} file ids that the harness "
            "did not derive from the files' SHA-256; ids should follow the content"
        )


async def stored_by(pipe: TextPipeline, file_ids: set[str], timeout: float) -> float:
    """When the last of the files was stored, as its event arrived."""
    try:
        return await unless_broken(
            pipe.events.wait_for_all(file_ids, timeout), pipe.events, pipe.services
        )
    except BenchmarkError as exc:
        raise BenchmarkError(
            f"{exc}; the worker's log ends:\n{pipe.worker.tail()}"
        ) from None


def check_events(events: StoredEvents, files: Sequence[TextFile]) -> None:
    """Every event must carry the SHA-256 and size of the file it announces."""
    for item in files:
        _, body = events.arrivals[item.file_id]
        if body.get("sha256") != item.sha256 or int(body.get("size", -1)) != item.size:
            raise BenchmarkError(
                f"the file.stored event of {item.file_id} reports SHA-256 "
                f"{body.get('sha256')} and size {body.get('size')}, but the file "
                f"sent has {item.sha256} and {item.size} bytes"
            )


async def check_catalog(pipe: TextPipeline, item: TextFile) -> str:
    """One file's catalog row and stored bytes, held against what was sent."""
    stored = await status_of(item.file_id, pipe.env)
    source = SourceFile(item.path, item.size, item.sha256)
    _, event = pipe.events.arrivals[item.file_id]
    return verify(source, event, stored)


# --- small: many files of 1 KiB packets ----------------------------------------


@benchmark(
    "small",
    "1 KiB text packets in many small files: sender -> gateway -> text worker",
    order=60,
)
async def small(context: RunContext) -> list[Figure]:
    options = context.options
    per_file = options.small_per_file
    count = max(1, options.small_count // per_file)
    files = write_text_files(
        options.work_dir / "small-files", count, per_file * options.small_size
    )
    async with text_pipeline(context, "small") as pipe:
        run, peaks = await measured_burst(pipe, context, files)
        checked = await check_catalog(pipe, files[-1])
    return small_figures(context, files, run, peaks, checked)


async def measured_burst(
    pipe: TextPipeline, context: RunContext, files: Sequence[TextFile]
) -> tuple[Delivered, dict[str, int]]:
    """The burst, with the gateway's and the worker's peak RSS sampled."""
    sampler = PeakSampler(
        {"gateway": pipe.gateway.watch(), "worker": pipe.worker.watch()}
    )
    sampler.start()
    try:
        delivered = await send_and_store(pipe, context, files)
    finally:
        peaks = sampler.stop()
    return delivered, peaks


def small_figures(
    context: RunContext,
    files: Sequence[TextFile],
    run: Delivered,
    peaks: dict[str, int],
    checked: str,
) -> list[Figure]:
    options = context.options
    size = options.small_size
    sent = run.sent
    packets = sent.packets()
    buffered = sent.packets("packets_buffered")
    detail = (
        f"{packets} packets in {len(files)} files of {size_name(files[0].size)}, "
        f"sent in batches by one sender; all stored {run.seconds:.2f} s after it "
        f"began (its last 2xx at {sent.finished - sent.started:.2f} s; its "
        f"start-up, {sent.startup:.2f} s, not counted); a file.stored event with "
        f"the right SHA-256 for every file, and {checked} checked for one; "
        f"{buffered} packets went to the outbox; {run.cores}"
    )
    return [
        Figure(
            f"pipeline/text/{options.queue_type}/{size}",
            f"datahaul pipeline, text, {options.queue_type}, {size_name(size)} packets",
            packets / run.seconds,
            "packets/s",
            detail,
        ),
        Figure(
            f"mem/gateway/text-{size}",
            f"gateway peak RSS, {size_name(size)} text packets",
            peaks["gateway"] / MB,
            "MB",
            f"sampled every 50 ms, children included; the text worker's peak "
            f"{peaks['worker'] / MB:.1f} MB",
        ),
    ]


# --- latency: one-packet files at half the highest rate --------------------------


@benchmark(
    "latency",
    "one-packet text files at half their highest rate: 2xx -> file.stored time",
    order=80,
)
async def latency(context: RunContext) -> list[Figure]:
    options = context.options
    size = options.small_size
    burst_files = write_text_files(
        options.work_dir / "latency-burst", options.latency_count, size
    )
    async with text_pipeline(context, "latency") as pipe:
        burst = await send_and_store(pipe, context, burst_files)
        highest = len(burst_files) / burst.seconds
        rate = options.latency_rate or highest / 2
        paced_count = max(20, math.ceil(rate * options.latency_seconds))
        paced_files = write_text_files(
            options.work_dir / "latency-paced", paced_count, size
        )
        paced = await send_and_store(pipe, context, paced_files, "paced", rate)
        delays = latencies(pipe.events, paced.sent)
    return latency_figures(context, burst, rate, paced, delays)


def latencies(events: StoredEvents, paced: DriveRun) -> list[float]:
    """Seconds from each file's 2xx to its file.stored event, in file order."""
    delays = []
    for item in paced.files:
        answered = item["answered"]
        if answered is None:
            raise BenchmarkError(
                f"the sender heard no 2xx for file {item['file_id']} yet says it "
                "was sent; no latency can be taken for it"
            )
        arrived, _ = events.arrivals[str(item["file_id"])]
        delays.append(arrived - float(answered))
    return delays


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest rank: the smallest value with at least `share` of them at or below."""
    if not values:
        raise BenchmarkError("no latency was measured")
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def latency_figures(
    context: RunContext,
    burst: Delivered,
    rate: float,
    paced: Delivered,
    delays: list[float],
) -> list[Figure]:
    options = context.options
    size = size_name(options.small_size)
    highest = options.latency_count / burst.seconds
    sent = paced.sent
    chosen = (
        "as --latency-rate chose"
        if options.latency_rate
        else f"half the {highest:,.0f} files/s of the burst"
    )
    fifth = max(1, len(delays) // 5)
    early, late = delays[:fifth], delays[-fifth:]
    how = (
        f"{len(delays)} one-packet {size} text files started at {rate:,.0f} "
        f"files/s ({chosen}) over {sent.finished - sent.started:.1f} s, the sender "
        f"at most {sent.record['late_seconds'] * 1000:.0f} ms behind schedule; "
        f"stored at {len(delays) / paced.seconds:,.0f} files/s; from the 2xx the "
        "sender heard to the file.stored event the harness heard; p50 of the "
        f"first and of the last fifth sent: {percentile(early, 0.5) * 1000:,.0f} "
        f"and {percentile(late, 0.5) * 1000:,.0f} ms; {paced.cores}"
    )
    figures = [
        Figure(
            "latency/text/burst",
            f"one-packet {size} text files, all at once, end to end",
            highest,
            "files/s",
            f"{options.latency_count} files sent together by one sender, from its "
            f"go to the last file.stored event ({burst.seconds:.2f} s); sets the "
            f"steady rate; {burst.cores}",
        )
    ]
    for name, share in (("p50", 0.50), ("p99", 0.99), ("max", 1.0)):
        figures.append(
            Figure(
                f"latency/text/{name}",
                f"2xx to file.stored, {name}, at half the highest rate",
                percentile(delays, share) * 1000,
                "ms",
                how if name == "p50" else f"the same {len(delays)} files as p50",
            )
        )
    return figures
