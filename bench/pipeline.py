"""The datahaul pipeline end to end: sender -> gateway -> RabbitMQ -> worker -> store.

The gateway and a video worker run as their own processes in a fresh vhost
with a fresh data directory; `datahaul send` sends the source file; the
clock stops when the worker's "file stored" event arrives. The stored
SHA-256 must equal the source's, or the figure is not reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import aiohttp
import psutil
import structlog
from aio_pika.abc import AbstractIncomingMessage

from bench.procs import (
    CpuMeter,
    PeakSampler,
    broker_process,
    device_of,
    payload_per_cpu_second,
    tree_high_water,
)
from bench.rabbit import fresh_vhost
from bench.registry import BenchmarkError, Figure, RunContext, SourceFile, benchmark
from bench.units import MB, flag_name, mb_per_s, size_name

log = structlog.get_logger("datahaul.bench")
T = TypeVar("T")

DATAHAUL = str(Path(sys.executable).with_name("datahaul"))
EVENT_EXCHANGE = "datahaul.events"
STORED_KEY = "file.stored.#"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
PR_SET_PDEATHSIG = 1


@dataclass
class Service:
    """One datahaul process started for the benchmark, with its log file."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    def watch(self) -> psutil.Process:
        """The process, for sampling; an error with its log if it has died."""
        self.check_alive()
        try:
            return psutil.Process(self.process.pid)
        except psutil.NoSuchProcess:
            raise BenchmarkError(
                f"datahaul {self.name} is gone; the end of its log:\n{self.tail()}"
            ) from None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise BenchmarkError(
                f"datahaul {self.name} exited with code {self.process.returncode}; "
                f"the end of its log:\n{self.tail()}"
            )


@dataclass
class StoredEvents:
    """The 'file stored' events seen on the events exchange, by file id."""

    arrivals: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    lost: str | None = None

    def connection_lost(self, *_: object) -> None:
        self.lost = "the events connection to RabbitMQ closed during the run"
        self.changed.set()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        arrived = time.perf_counter()
        body = json.loads(message.body)
        self.arrivals.setdefault(str(body.get("file_id")), (arrived, body))
        self.changed.set()

    async def wait_for(
        self, file_id: str, within: float
    ) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + within
        while file_id not in self.arrivals:
            if self.lost:
                raise BenchmarkError(
                    f"{self.lost} (was RabbitMQ restarted?); the figure would not "
                    "be a clean measurement"
                )
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchmarkError(
                    f"no file.stored event for {file_id} within {within:g} s; "
                    f"events seen for: {sorted(self.arrivals) or 'none'}"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return self.arrivals[file_id]

    async def wait_for_all(self, file_ids: set[str], within: float) -> float:
        """When the last of `file_ids` was stored; an error naming what is missing."""
        deadline = time.monotonic() + within
        while missing := file_ids - self.arrivals.keys():
            if self.lost:
                raise BenchmarkError(
                    f"{self.lost} (was RabbitMQ restarted?); the figure would not "
                    "be a clean measurement"
                )
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                example = ", ".join(sorted(missing)[:3])
                raise BenchmarkError(
                    f"{len(missing)} of {len(file_ids)} files had no file.stored "
                    f"event within {within:g} s (e.g. {example})"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return max(self.arrivals[file_id][0] for file_id in file_ids)


@benchmark(
    "pipeline",
    "datahaul send -> gateway -> RabbitMQ -> video worker -> store",
    order=50,
)
async def pipeline(context: RunContext) -> list[Figure]:
    figures = []
    for chunk in context.options.chunk_sizes:
        figures += await one_transfer(context, chunk)
    return figures


async def one_transfer(context: RunContext, chunk: int) -> list[Figure]:
    options = context.options
    source = context.source()
    data_dir = options.work_dir / f"pipeline-{flag_name(chunk)}"
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"

    async with fresh_vhost(options.amqp_url, "pipeline") as amqp_url:
        env = os.environ | {
            "DATAHAUL_AMQP_URL": amqp_url,
            "DATAHAUL_DATA_DIR": str(data_dir),
            "DATAHAUL_QUEUE_TYPE": options.queue_type,
        }
        async with services(env, port, data_dir) as (gateway, worker):
            await wait_ready(gateway, worker, gateway_url, amqp_url)
            startup = await startup_seconds(env)
            async with stored_events(amqp_url) as events:
                run = await timed_send(
                    context, source, chunk, gateway_url, env, events, gateway, worker
                )
            stored = await status_of(run.file_id, env)

    checked = verify(source, run.event, stored)
    # Two stored copies of a 4 GiB source per chunk size would fill /tmp.
    shutil.rmtree(data_dir, ignore_errors=True)
    figures = transfer_figures(options.queue_type, chunk, source, run, startup, checked)
    context.note_cpu(
        f"pipeline/{options.queue_type}/{chunk}", run.meter.used, source.size
    )
    return [
        *figures,
        *disk_figures(context, options.queue_type, chunk, source, run),
        payload_per_cpu_second(
            "pipeline", options.queue_type, chunk, source.size, run.meter
        ),
    ]


@dataclass(frozen=True)
class TransferRun:
    file_id: str
    send_seconds: float
    stored_seconds: float
    event: dict[str, Any]
    peaks: dict[str, int]
    high_water: dict[str, int]
    meter: CpuMeter


async def timed_send(
    context: RunContext,
    source: SourceFile,
    chunk: int,
    gateway_url: str,
    env: dict[str, str],
    events: StoredEvents,
    gateway: Service,
    worker: Service,
) -> TransferRun:
    """Send the file; the clock runs from the sender's start to the event."""
    watched = {"gateway": gateway.watch(), "worker": worker.watch()}
    broker = broker_process()
    meter = CpuMeter(
        watched | ({"broker": broker} if broker else {}),
        self_label=None,
        children_label="sender",
        device=device_of(context.options.work_dir),
    )
    sampler = PeakSampler(watched)
    sampler.start()
    try:
        with meter.measure():
            started = time.perf_counter()
            file_id, sent, arrived, event = await unless_broken(
                send_and_wait(context, source, chunk, gateway_url, env, events, worker),
                events,
                [gateway, worker],
            )
        high_water = {name: tree_high_water(p) for name, p in watched.items()}
    finally:
        peaks = sampler.stop()
    return TransferRun(
        file_id,
        sent - started,
        arrived - started,
        event,
        peaks,
        high_water,
        meter,
    )


async def send_and_wait(
    context: RunContext,
    source: SourceFile,
    chunk: int,
    gateway_url: str,
    env: dict[str, str],
    events: StoredEvents,
    worker: Service,
) -> tuple[str, float, float, dict[str, Any]]:
    """Run the sender, then wait for its file's event: id and the two instants."""
    output = await run_sender(source.path, chunk, gateway_url, env, context)
    sent = time.perf_counter()
    file_id = file_id_from(output)
    try:
        arrived, event = await events.wait_for(file_id, context.options.timeout)
    except BenchmarkError as exc:
        raise BenchmarkError(
            f"{exc}; the worker's log ends:\n{worker.tail()}"
        ) from None
    return file_id, sent, arrived, event


async def unless_broken(
    transfer: Coroutine[Any, Any, T], events: StoredEvents, services: list[Service]
) -> T:
    """Run the transfer, abandoned at once if a service dies or the broker goes.

    Either makes the figure meaningless, and waiting out the timeout would
    only hide what happened.
    """
    work = asyncio.ensure_future(transfer)
    while not work.done():
        await asyncio.wait({work}, timeout=0.5)
        broken = [s for s in services if s.process.returncode is not None]
        if work.done() or not (broken or events.lost):
            continue
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        for service in broken:
            service.check_alive()
        raise BenchmarkError(f"{events.lost} (was RabbitMQ restarted?)")
    return work.result()


async def run_sender(
    path: Path, chunk: int, gateway_url: str, env: dict[str, str], context: RunContext
) -> str:
    command = [
        DATAHAUL, "send", str(path), "--type", "video",
        "--chunk-size", flag_name(chunk), "--gateway", gateway_url, "--json",
        "--no-progress",
    ]  # fmt: skip
    sender = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(sender.communicate(), context.options.timeout)
    except TimeoutError:
        raise BenchmarkError(
            f"datahaul send did not finish within {context.options.timeout:g} s"
        ) from None
    finally:
        if sender.returncode is None:
            sender.kill()
            await sender.wait()
    if sender.returncode != 0:
        raise BenchmarkError(
            f"`{' '.join(command)}` exited with code {sender.returncode}: "
            f"{err.decode(errors='replace').strip()[-2000:]}"
        )
    return out.decode()


async def startup_seconds(env: dict[str, str]) -> float:
    """How long `datahaul send --help` takes: the start-up inside each send."""
    started = time.perf_counter()
    helper = await asyncio.create_subprocess_exec(
        DATAHAUL, "send", "--help", env=env, stdout=asyncio.subprocess.DEVNULL
    )
    await helper.wait()
    return time.perf_counter() - started


def file_id_from(output: str) -> str:
    """The file id in the sender's --json output (one object, a list, or lines)."""
    documents: list[Any] = []
    try:
        documents.append(json.loads(output))
    except json.JSONDecodeError:
        for line in output.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                documents.append(json.loads(line))
    for document in documents:
        for item in document if isinstance(document, list) else [document]:
            if isinstance(item, dict):
                files = item.get("files")
                if isinstance(files, list) and files and isinstance(files[0], dict):
                    item = files[0]
                if "file_id" in item:
                    return str(item["file_id"])
    raise BenchmarkError(
        f"datahaul send --json printed no file_id; it printed: {output.strip()[:500]!r}"
    )


async def status_of(file_id: str, env: dict[str, str]) -> dict[str, Any]:
    """`datahaul status FILE_ID --json`, the catalog's own account of the file."""
    status = await asyncio.create_subprocess_exec(
        DATAHAUL, "status", file_id, "--json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await status.communicate()
    if status.returncode != 0:
        raise BenchmarkError(
            f"datahaul status {file_id} --json exited with code {status.returncode}: "
            f"{err.decode(errors='replace').strip()[-1000:]}"
        )
    try:
        document = json.loads(out)
    except json.JSONDecodeError:
        raise BenchmarkError(
            f"datahaul status --json printed no JSON: {out.decode()[:300]!r}"
        ) from None
    if not isinstance(document, dict):
        raise BenchmarkError(f"datahaul status --json printed {document!r}")
    return document


def verify(source: SourceFile, event: dict[str, Any], stored: dict[str, Any]) -> str:
    """The event, the catalog and the stored bytes must all match the source.

    Returns what was compared, for the figure's note.
    """
    claims = {
        "file.stored event": (event.get("sha256"), event.get("size")),
        "datahaul status": (stored.get("sha256"), stored.get("size")),
    }
    for where, (sha256, size) in claims.items():
        if sha256 != source.sha256 or (size is not None and int(size) != source.size):
            raise BenchmarkError(
                f"{where} reports SHA-256 {sha256} and size {size}, but the source "
                f"has {source.sha256} and {source.size} bytes"
            )
    if stored.get("state") != "stored":
        raise BenchmarkError(f"datahaul status says state={stored.get('state')!r}")
    location = stored_path(stored.get("location"))
    if location is None:
        return "event and catalog"
    if sha256_of(location) != source.sha256:
        raise BenchmarkError(f"the bytes stored at {location} differ from the source")
    return "event, catalog and stored blob"


def stored_path(location: object) -> Path | None:
    """The blob's path when the store is a local directory, else None."""
    if not isinstance(location, str) or not location.startswith("file://"):
        return None
    path = Path(urllib.parse.unquote(location.removeprefix("file://")))
    if not path.is_file():
        raise BenchmarkError(f"the catalog says the file is at {location}; it is not")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as blob:
        while block := blob.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def transfer_figures(
    queue_type: str,
    chunk: int,
    source: SourceFile,
    run: TransferRun,
    startup: float,
    checked: str,
) -> list[Figure]:
    chunk_name = size_name(chunk)
    rate = mb_per_s(source.size, run.stored_seconds)
    detail = (
        f"{size_name(source.size)} stored {run.stored_seconds:.2f} s after the "
        f"sender started (sender exited at {run.send_seconds:.2f} s; its start-up "
        f"alone, `send --help`, takes {startup:.2f} s); SHA-256 verified in "
        f"{checked}; {run.meter.cores()}; {run.meter.disk(source.size)}"
    )
    figures = [
        Figure(
            f"pipeline/video/{queue_type}/{chunk}",
            f"datahaul pipeline, video, {queue_type}, {chunk_name} chunks",
            rate,
            "MB/s",
            detail,
        )
    ]
    for name in ("gateway", "worker"):
        figures.append(
            Figure(
                f"mem/{name}/{chunk}",
                f"{name} peak RSS, {chunk_name} chunks",
                run.peaks[name] / MB,
                "MB",
                f"sampled every 50 ms, children included; kernel VmHWM sum "
                f"{run.high_water[name] / MB:.1f} MB; file {size_name(source.size)}",
            )
        )
    return figures


def disk_figures(
    context: RunContext,
    queue_type: str,
    chunk: int,
    source: SourceFile,
    run: TransferRun,
) -> list[Figure]:
    """The device's write rate during the transfer, and the bound it implies."""
    meter = run.meter
    if meter.device_bytes <= 0 or meter.wall <= 0:
        return []
    per_byte = meter.device_bytes / source.size
    detail = f"{meter.disk(source.size)}; every process on the machine counted"
    ceiling = context.figure("disk/write")
    if ceiling is not None:
        detail += (
            f"; the disk part of this run took {ceiling.value:.0f} MB/s of "
            f"durable 8 MiB writes, which at {per_byte:.1f} bytes per payload "
            f"byte is {ceiling.value / per_byte:.0f} MB/s of payload"
        )
    return [
        Figure(
            f"disk/pipeline/{queue_type}/{chunk}",
            f"disk writes during the pipeline, {size_name(chunk)} chunks",
            mb_per_s(meter.device_bytes, meter.wall),
            "MB/s",
            detail,
        )
    ]


# --- starting and stopping the services --------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def services(
    env: dict[str, str], port: int, data_dir: Path, worker_type: str = "video"
) -> AsyncIterator[tuple[Service, Service]]:
    """A gateway on `port` and a worker of one data type, stopped afterwards."""
    async with (
        service("gateway", ["gateway", "--port", str(port)], env, data_dir) as gateway,
        service("worker", ["worker", "--type", worker_type], env, data_dir) as worker,
    ):
        yield gateway, worker


@contextlib.asynccontextmanager
async def service(
    name: str, args: list[str], env: dict[str, str], data_dir: Path
) -> AsyncIterator[Service]:
    """One datahaul process, stopped (SIGTERM, then SIGKILL) on the way out."""
    make_dir(data_dir)
    started = await start(name, args, env, data_dir)
    try:
        yield started
    finally:
        await stop(started)


def make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


async def start(
    name: str, args: list[str], env: dict[str, str], data_dir: Path
) -> Service:
    log_path = data_dir.parent / f"{data_dir.name}-{name}.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            DATAHAUL,
            *args,
            env=env,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    return Service(name, process, log_path)


def die_with_parent() -> None:
    """In the child: get SIGTERM if the harness dies without cleaning up."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def stop(service: Service) -> None:
    """SIGTERM for a clean shutdown; SIGKILL if it does not come."""
    if service.process.returncode is not None:
        return
    service.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(service.process.wait(), STOP_TIMEOUT)
    except TimeoutError:
        log.warning("bench.service_killed", service=service.name)
        service.process.kill()
        await service.process.wait()


async def wait_ready(
    gateway: Service,
    worker: Service,
    gateway_url: str,
    amqp_url: str,
    queue: str = "video_data_queue",
) -> None:
    """The gateway answers /healthz and the worker consumes its queue."""
    deadline = time.monotonic() + READY_TIMEOUT
    await wait_healthy(gateway, gateway_url, deadline, also=[worker])
    while await consumers(amqp_url, queue) < 1:
        worker.check_alive()
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"the worker did not consume {queue} within "
                f"{READY_TIMEOUT:g} s; its log:\n{worker.tail()}"
            )
        await asyncio.sleep(0.2)


async def wait_healthy(
    gateway: Service,
    gateway_url: str,
    deadline: float,
    also: Sequence[Service] = (),
) -> None:
    """Until the gateway answers /healthz with 200; any service dying ends it."""
    async with aiohttp.ClientSession() as session:
        while not await healthy(session, gateway_url):
            for watched in (gateway, *also):
                watched.check_alive()
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"the gateway did not answer {gateway_url}/healthz within "
                    f"{READY_TIMEOUT:g} s; its log:\n{gateway.tail()}"
                )
            await asyncio.sleep(0.2)


async def healthy(session: aiohttp.ClientSession, gateway_url: str) -> bool:
    try:
        async with session.get(f"{gateway_url}/healthz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def consumers(amqp_url: str, queue_name: str) -> int:
    """How many consumers the queue has; 0 while it does not exist yet."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.consumer_count or 0)
    except aio_pika.exceptions.ChannelClosed:
        return 0
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def stored_events(
    amqp_url: str, routing_key: str = STORED_KEY
) -> AsyncIterator[StoredEvents]:
    """Subscribe to file.stored events before anything is sent."""
    events = StoredEvents()
    connection = await aio_pika.connect(amqp_url)
    connection.close_callbacks.add(events.connection_lost)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            EVENT_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=routing_key)
        # Unacked delivery: an ack per event would put one more socket write
        # per file into the harness that times the files.
        await queue.consume(events.on_message, no_ack=True)
        yield events
    finally:
        await connection.close()
