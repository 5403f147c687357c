"""The bare RabbitMQ ceiling: a minimal aio-pika client, nothing else.

One process publishes persistent messages with many publisher confirms in
flight and consumes them with acks on a second connection. What it reaches
is what the broker and one client can do on this machine; the pipeline is
judged against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import psutil
import structlog
from aio_pika.abc import AbstractIncomingMessage

from bench.procs import CpuMeter, broker_process, device_of, payload_per_cpu_second
from bench.registry import BenchmarkError, Figure, Options, RunContext, benchmark
from bench.units import mb_per_s, size_name

log = structlog.get_logger("datahaul.bench")

ANSI = re.compile(r"\x1b\[[0-9;]*m")
VHOST_DELETE_RETRIES = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
ALL_RIGHTS = (".*", ".*", ".*")


# --- vhosts -----------------------------------------------------------------


async def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl; a failure names the command and what it printed."""
    try:
        process = await asyncio.create_subprocess_exec(
            "rabbitmqctl",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise BenchmarkError(
            "rabbitmqctl is not on PATH; the benchmark creates its own vhosts "
            "with it, so run it where RabbitMQ is installed"
        ) from None
    out, err = await process.communicate()
    if process.returncode != 0:
        reason = ANSI.sub("", err.decode()).strip().splitlines()
        raise BenchmarkError(
            f"rabbitmqctl {' '.join(args)} failed: {reason[0] if reason else '?'}"
        )
    return out.decode()


@contextlib.asynccontextmanager
async def fresh_vhost(base_url: str, purpose: str) -> AsyncIterator[str]:
    """A new vhost for guest, deleted afterwards; yields its AMQP URL."""
    name = f"datahaul-bench-{purpose}-{os.getpid()}-{secrets.token_hex(3)}"
    await rabbitmqctl("add_vhost", name)
    try:
        await rabbitmqctl("set_permissions", "-p", name, "guest", *ALL_RIGHTS)
        yield with_vhost(base_url, name)
    finally:
        await delete_vhost(name)


async def delete_vhost(name: str) -> None:
    """Delete, retrying while the broker is down; never hide the run's own error."""
    for delay in VHOST_DELETE_RETRIES:
        try:
            await rabbitmqctl("delete_vhost", name)
            return
        except BenchmarkError as exc:
            last = str(exc)
        await asyncio.sleep(delay)
    log.warning(
        "bench.vhost_left",
        vhost=name,
        error=last,
        remove_with=f"rabbitmqctl delete_vhost {name}",
    )


class VhostLink:
    """guest's way into one vhost, cut and given back at the broker itself.

    Cutting takes guest's permissions on the vhost away and closes every
    connection in it, so a client there finds the broker refusing it until
    the permissions come back. Nothing sits between client and broker, as
    nothing sits between the bare client and the broker.
    """

    def __init__(self, amqp_url: str) -> None:
        self.vhost = vhost_of(amqp_url)

    async def cut(self) -> None:
        await rabbitmqctl("clear_permissions", "-p", self.vhost, "guest")
        await rabbitmqctl(
            "close_all_connections", "-p", self.vhost, "benchmark: broker link cut"
        )

    async def restore(self) -> None:
        await rabbitmqctl("set_permissions", "-p", self.vhost, "guest", *ALL_RIGHTS)


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names ("/" when it names none)."""
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def with_vhost(url: str, vhost: str) -> str:
    """The same broker URL pointing at another vhost."""
    parts = urllib.parse.urlsplit(url)
    path = "/" + urllib.parse.quote(vhost, safe="")
    return urllib.parse.urlunsplit(parts._replace(path=path))


# --- the minimal client -------------------------------------------------------


@dataclass(frozen=True)
class RoundTrip:
    """Timings of one run of the minimal client."""

    messages: int
    payload_bytes: int
    publish_seconds: float
    total_seconds: float
    meter: CpuMeter

    @property
    def cores(self) -> str:
        return self.meter.cores()

    @property
    def disk(self) -> str:
        return self.meter.disk(self.payload_bytes)


def file_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    """The file's bytes in messages of `chunk_size`, as the sender cuts them."""
    with path.open("rb") as source:
        while chunk := source.read(chunk_size):
            yield chunk


def small_bodies(size: int, count: int) -> Iterator[bytes]:
    """`count` different random bodies of `size` bytes, cut from one buffer."""
    pool = os.urandom(size * 1024)
    offsets = itertools.cycle(range(0, len(pool), size))
    for offset in itertools.islice(offsets, count):
        yield pool[offset : offset + size]


async def publish_all(
    channel: aio_pika.abc.AbstractChannel,
    queue_name: str,
    bodies: Iterator[bytes],
    window: int,
) -> tuple[int, int]:
    """Publish every body persistently, at most `window` confirms in flight."""
    slots = asyncio.Semaphore(window)
    in_flight: set[asyncio.Future[Any]] = set()
    failures: list[BaseException] = []
    count = size = 0

    def settled(future: asyncio.Future[Any]) -> None:
        in_flight.discard(future)
        slots.release()
        error = None if future.cancelled() else future.exception()
        if error is not None:
            failures.append(error)

    for body in bodies:
        await slots.acquire()
        if failures:
            break
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        publish = channel.default_exchange.publish(message, queue_name, mandatory=True)
        future: asyncio.Future[Any] = asyncio.ensure_future(publish)
        in_flight.add(future)
        future.add_done_callback(settled)
        count += 1
        size += len(body)

    await asyncio.gather(*in_flight, return_exceptions=True)
    if failures:
        raise BenchmarkError(f"the broker refused a publish: {failures[0]!r}")
    return count, size


class Acker:
    """Consumes a queue with acks and says when `expected` messages came."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.messages = 0
        self.bytes = 0
        self.done = asyncio.get_running_loop().create_future()
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, channel: aio_pika.abc.AbstractChannel, name: str) -> None:
        self._queue = await channel.get_queue(name)
        self._tag = await self._queue.consume(self._on_message)

    async def finish(self, within: float) -> int:
        """Wait for the last message, then cancel so the queue can go."""
        try:
            await asyncio.wait_for(asyncio.shield(self.done), within)
        except TimeoutError:
            raise BenchmarkError(
                f"consumed {self.messages} of {self.expected} messages in {within:g} s"
            ) from None
        if self._queue is not None and self._tag is not None:
            await self._queue.cancel(self._tag)
        return self.bytes

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages += 1
        self.bytes += len(message.body)
        await message.ack()
        if self.messages >= self.expected and not self.done.done():
            self.done.set_result(None)


async def round_trip(
    url: str,
    queue_type: str,
    bodies: Iterator[bytes],
    expected: int,
    settings: Options,
    *,
    consume_while_publishing: bool = True,
    broker: psutil.Process | None = None,
) -> RoundTrip:
    """Publish `expected` messages and consume them, on two connections."""
    queue_name = f"bench.ceiling.{secrets.token_hex(3)}"
    publisher = await aio_pika.connect(url)
    consumer = await aio_pika.connect(url)
    try:
        pub_channel = await publisher.channel(on_return_raises=True)
        await pub_channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": queue_type}
        )
        sub_channel = await consumer.channel()
        await sub_channel.set_qos(prefetch_count=settings.prefetch)
        acker = Acker(expected)

        meter = CpuMeter(
            {"broker": broker} if broker else {}, device=device_of(settings.work_dir)
        )
        with meter.measure():
            started = time.perf_counter()
            if consume_while_publishing:
                await acker.start(sub_channel, queue_name)
            count, size = await publish_all(
                pub_channel, queue_name, bodies, settings.window
            )
            published = time.perf_counter()
            if not consume_while_publishing:
                await acker.start(sub_channel, queue_name)
            got = await acker.finish(settings.timeout)
            finished = time.perf_counter()

        if count != expected or got != size:
            raise BenchmarkError(
                f"published {count} messages of {size} bytes but expected "
                f"{expected} and consumed {got} bytes"
            )
        await pub_channel.queue_delete(queue_name)
    finally:
        await consumer.close()
        await publisher.close()
    return RoundTrip(
        count,
        size,
        published - started,
        finished - started,
        meter,
    )


# --- registered benchmarks ----------------------------------------------------


@benchmark(
    "bare",
    "bare aio-pika client, the source file at each chunk size",
    order=10,
)
async def bare_large(context: RunContext) -> list[Figure]:
    options = context.options
    source = context.source()
    broker = broker_process()
    figures = []
    async with fresh_vhost(options.amqp_url, "bare") as url:
        for chunk in options.chunk_sizes:
            expected = -(-source.size // chunk)
            run = await round_trip(
                url,
                options.queue_type,
                file_chunks(source.path, chunk),
                expected,
                options,
                broker=broker,
            )
            figures.append(large_figure("bare", options.queue_type, chunk, run))
            context.note_cpu(
                f"bare/{options.queue_type}/{chunk}", run.meter.used, run.payload_bytes
            )
            figures.append(
                payload_per_cpu_second(
                    "bare", options.queue_type, chunk, run.payload_bytes, run.meter
                )
            )
    return figures


@benchmark(
    "bare-1k",
    "bare aio-pika client, small messages (the 1 KiB ceiling)",
    order=20,
)
async def bare_small(context: RunContext) -> list[Figure]:
    options = context.options
    size, count = options.small_size, options.small_count
    async with fresh_vhost(options.amqp_url, "bare1k") as url:
        run = await round_trip(
            url,
            options.queue_type,
            small_bodies(size, count),
            count,
            options,
            broker=broker_process(),
        )
    rate = run.messages / run.total_seconds
    detail = (
        f"{run.messages} msgs in {run.total_seconds:.2f} s; "
        f"publish side {run.messages / run.publish_seconds:,.0f} msg/s; {run.cores}"
    )
    return [
        Figure(
            f"bare/{options.queue_type}/{size}",
            f"bare client, {options.queue_type}, {size_name(size)} messages",
            rate,
            "msg/s",
            detail,
        )
    ]


@benchmark(
    "bare-publish",
    "bare aio-pika client publishing alone, then draining (the outbox ceiling)",
    order=30,
)
async def bare_publish(context: RunContext) -> list[Figure]:
    options = context.options
    figures = []
    async with fresh_vhost(options.amqp_url, "barepub") as url:
        for size in options.publish_sizes:
            if size <= options.small_size:
                count, bodies = (
                    options.small_count,
                    small_bodies(size, options.small_count),
                )
            else:
                count = -(-context.source().size // size)
                bodies = file_chunks(context.source().path, size)
            run = await round_trip(
                url,
                options.queue_type,
                bodies,
                count,
                options,
                consume_while_publishing=False,
                broker=broker_process(),
            )
            figures.append(publish_figure(options.queue_type, size, run))
    return figures


def large_figure(kind: str, queue_type: str, chunk: int, run: RoundTrip) -> Figure:
    rate = mb_per_s(run.payload_bytes, run.total_seconds)
    detail = (
        f"{run.messages} msgs ({run.messages / run.total_seconds:,.0f} msg/s) "
        f"in {run.total_seconds:.2f} s; {run.cores}; {run.disk}"
    )
    return Figure(
        f"{kind}/{queue_type}/{chunk}",
        f"bare client, {queue_type}, {size_name(chunk)} messages",
        rate,
        "MB/s",
        detail,
    )


def publish_figure(queue_type: str, size: int, run: RoundTrip) -> Figure:
    drain = run.total_seconds - run.publish_seconds
    publish_rate = run.messages / run.publish_seconds
    detail = (
        f"{run.messages} msgs published in {run.publish_seconds:.2f} s "
        f"({mb_per_s(run.payload_bytes, run.publish_seconds):.0f} MB/s), "
        f"then drained at {run.messages / drain:,.0f} msg/s; {run.cores}"
    )
    return Figure(
        f"bare-publish/{queue_type}/{size}",
        f"bare client publishing alone, {queue_type}, {size_name(size)} messages",
        publish_rate,
        "msg/s",
        detail,
    )
