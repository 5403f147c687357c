"""The least pipeline of datahaul's shape, run end to end beside the real one.

Three processes, as in datahaul: a robot reads the source file in chunks,
hashes each with XXH128 and streams them over TCP to a relay; the relay
checks each chunk and publishes it persistently to a queue with publisher
confirms in flight (aio-pika, as the bare client does); a store consumes
with acks, checks each chunk again, writes it at its place with `O_DIRECT`,
hashes the file with SHA-256 in order and fdatasyncs before it acks. There
is nothing else: no HTTP, no JSON, no file id, no catalog, no outbox, no
retries (bench/least_roles.py).

It is not a product and carries none of datahaul's guarantees past a
clean run. It measures, instead of adding up, what the floor part
estimates: how fast any pipeline of this shape built on the bare client's
library can go on this machine. The clock runs from the robot's start to
the store's last fdatasync; the stored file's SHA-256 must match the
source's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import psutil

from bench.least_roles import DIRECT_ALIGN
from bench.pipeline import die_with_parent
from bench.procs import CpuMeter, broker_process, device_of, payload_per_cpu_second
from bench.rabbit import fresh_vhost
from bench.registry import BenchmarkError, Figure, RunContext, SourceFile, benchmark
from bench.units import mb_per_s, size_name

PROJECT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0
# How long a robot's failure waits to learn whether the relay died first.
RELAY_EXIT_WAIT = 5.0


@benchmark(
    "least",
    "the least pipeline of datahaul's shape on the bare client's library",
    order=52,
)
async def least_pipeline(context: RunContext) -> list[Figure]:
    options = context.options
    source = context.source()
    for chunk in options.chunk_sizes:
        if chunk % DIRECT_ALIGN:
            raise BenchmarkError(
                f"the least pipeline writes with O_DIRECT, so its chunk size "
                f"must be a multiple of {DIRECT_ALIGN}; {chunk} is not"
            )
    figures = []
    async with fresh_vhost(options.amqp_url, "least") as url:
        for chunk in options.chunk_sizes:
            figures += await one_run(context, url, source, chunk)
    return figures


async def one_run(
    context: RunContext, url: str, source: SourceFile, chunk: int
) -> list[Figure]:
    options = context.options
    queue = f"bench.least.{secrets.token_hex(3)}"
    await declare(url, queue, options.queue_type)
    image = options.work_dir / f"least-{chunk}.image"
    env = os.environ | {"DATAHAUL_LEAST_SIZE": str(source.size)}
    store_args = [url, queue, str(options.prefetch), str(image), str(chunk)]
    relay_args = [url, queue, str(options.window)]

    try:
        async with (
            role("store", store_args, env, options.work_dir) as store,
            role("relay", relay_args, env, options.work_dir) as relay,
        ):
            meter = role_meter(relay, store, options.work_dir)
            with meter.measure():
                started = time.monotonic()
                port = relay.ready.split()[1]
                await run_robot(port, source.path, chunk, options.timeout, relay)
                finished, sha256 = stored(await store.last_line(options.timeout))
    finally:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()

    if sha256 != source.sha256:
        raise BenchmarkError(
            f"the least pipeline stored a file with SHA-256 {sha256}; the source "
            f"has {source.sha256}"
        )
    context.note_cpu(f"least/{options.queue_type}/{chunk}", meter.used, source.size)
    return least_figures(options.queue_type, chunk, source, finished - started, meter)


def role_meter(relay: Role, store: Role, work_dir: Path) -> CpuMeter:
    """CPU of relay, store and broker; the robot's as this process's child."""
    broker = broker_process()
    return CpuMeter(
        {"relay": relay.watch(), "store": store.watch()}
        | ({"broker": broker} if broker else {}),
        self_label=None,
        children_label="robot",
        device=device_of(work_dir),
    )


def stored(line: str) -> tuple[float, str]:
    """The store's last line, 'done MONOTONIC SHA256', as (instant, digest)."""
    words = line.split()
    if len(words) != 3 or words[0] != "done":
        raise BenchmarkError(f"the least pipeline's store said {line!r}, not done")
    return float(words[1]), words[2]


def least_figures(
    queue_type: str, chunk: int, source: SourceFile, seconds: float, meter: CpuMeter
) -> list[Figure]:
    return [
        Figure(
            f"least/video/{queue_type}/{chunk}",
            f"least pipeline of datahaul's shape, {queue_type}, "
            f"{size_name(chunk)} chunks",
            mb_per_s(source.size, seconds),
            "MB/s",
            f"{size_name(source.size)} from the robot's start to the store's "
            f"last fdatasync in {seconds:.2f} s; SHA-256 of the stored file "
            f"checked; {meter.cores()}; {meter.disk(source.size)}",
        ),
        payload_per_cpu_second("least", queue_type, chunk, source.size, meter),
    ]


async def declare(url: str, queue: str, queue_type: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(
            queue, durable=True, arguments={"x-queue-type": queue_type}
        )
    finally:
        await connection.close()


class Role:
    """One of the least pipeline's processes, and the line it said it was ready."""

    def __init__(
        self, name: str, process: asyncio.subprocess.Process, log_path: Path
    ) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.ready = ""

    def watch(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    async def last_line(self, within: float) -> str:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), within)
        except TimeoutError:
            raise BenchmarkError(
                f"the least pipeline's {self.name} said nothing in {within:g} s"
            ) from None
        if not line:
            raise BenchmarkError(await self.failure())
        return line.decode().strip()

    async def failure(self) -> str:
        await self.process.wait()
        error = self.log_path.read_bytes()[-1500:].decode(errors="replace")
        return (
            f"the least pipeline's {self.name} exited with code "
            f"{self.process.returncode}: {error.strip()}"
        )


@contextlib.asynccontextmanager
async def role(
    name: str, args: list[str], env: dict[str, str], log_dir: Path
) -> AsyncIterator[Role]:
    """A relay or store, killed on the way out, and with the harness if it dies.

    Its stderr goes to a file: a pipe nobody reads until the end could fill
    and stop it.
    """
    log_path = log_dir / f"least-{name}.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.least_roles", name, *args,
            cwd=PROJECT, env=env, stdout=asyncio.subprocess.PIPE, stderr=log_file,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    started = Role(name, process, log_path)
    try:
        started.ready = await started.last_line(READY_TIMEOUT)
        yield started
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def run_robot(
    port: str, path: Path, chunk: int, within: float, relay: Role
) -> None:
    """Run the robot to its end; a relay that died says why the robot failed."""
    robot = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.least_roles", "robot",
        "127.0.0.1", port, str(path), str(chunk),
        cwd=PROJECT, stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        _, error = await asyncio.wait_for(robot.communicate(), within)
    except TimeoutError:
        robot.kill()
        await robot.wait()
        raise BenchmarkError(
            f"the least pipeline's robot ran past {within:g} s"
        ) from None
    if robot.returncode != 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(relay.process.wait(), RELAY_EXIT_WAIT)
        if relay.process.returncode is not None:
            raise BenchmarkError(await relay.failure())
        raise BenchmarkError(
            f"the least pipeline's robot exited with code {robot.returncode}: "
            f"{error.decode(errors='replace').strip()[-1500:]}"
        )
