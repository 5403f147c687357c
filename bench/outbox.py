"""Store-and-forward: the gateway's accept rate with its broker link cut, and
how fast its outbox drains once the link is back.

One `datahaul gateway`, in a fresh vhost and data directory, talks to
RabbitMQ directly, as the bare client does. The real sender (bench.drive)
sends one file of the outbox size while the link is up (the gateway's
normal rate, every packet published), then another after the broker
closed the gateway's connection and refuses it the vhost (every answer
must be 202: the packets are in the outbox). Then the vhost is given back
and /healthz is polled until the outbox is empty. No worker
runs, as no consumer runs under the bare publish ceiling; the queue must
then hold every packet of both files, and is purged.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import psutil
import structlog

from bench.drive import DriveRun, driver
from bench.pipeline import (
    READY_TIMEOUT,
    Service,
    free_port,
    service,
    wait_healthy,
)
from bench.procs import CpuMeter, broker_process, sampled, tree_high_water
from bench.rabbit import VhostLink, fresh_vhost
from bench.registry import (
    BenchmarkError,
    Figure,
    RunContext,
    benchmark,
    write_random_file,
)
from bench.units import MB, flag_name, mb_per_s, size_name
from datahaul.broker.topology import queue_for
from datahaul.config import Settings

log = structlog.get_logger("datahaul.bench")

POLL_SECONDS = 0.02
LINK_TIMEOUT = 30.0


@dataclass(frozen=True)
class Accepting:
    """One file sent to the gateway: the sender's account and the cores busy."""

    sent: DriveRun
    cores: str
    peak_rss: int

    @property
    def packets(self) -> int:
        return self.sent.packets()

    def rate(self) -> float:
        """Packets per second between the first and the last 2xx.

        The sender hashes the whole file before its first packet; that time
        is the same with the link up or cut and is not the gateway's.
        """
        first, last = self.sent.answer_window()
        if last <= first or self.packets < 2:
            raise BenchmarkError(
                "too few packets to time the gateway's answers; choose a larger "
                "--outbox-size or a smaller --outbox-chunk-size"
            )
        return (self.packets - 1) / (last - first)


@dataclass(frozen=True)
class Drain:
    packets: int
    reconnect_seconds: float
    drain_seconds: float
    cores: str
    peak_rss: int


@benchmark(
    "outbox",
    "gateway with its broker link cut: accept rate into the outbox, then its drain",
    order=70,
)
async def outbox(context: RunContext) -> list[Figure]:
    options = context.options
    size = options.outbox_size
    normal_file = write_random_file(options.work_dir / "outbox-up.video", size).path
    cut_file = write_random_file(options.work_dir / "outbox-cut.video", size).path
    data_dir = options.work_dir / "outbox-data"
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"

    async with fresh_vhost(options.amqp_url, "outbox") as amqp_url:
        link = VhostLink(amqp_url)
        env = os.environ | {
            "DATAHAUL_AMQP_URL": amqp_url,
            "DATAHAUL_DATA_DIR": str(data_dir),
            "DATAHAUL_QUEUE_TYPE": options.queue_type,
            # The outbox must hold the whole file sent with the link cut,
            # however large --size or --outbox-size made it, with room for
            # each row's overhead.
            "DATAHAUL_OUTBOX_QUOTA_BYTES": str(
                max(Settings().outbox_quota_bytes, 2 * size)
            ),
        }
        args = ["gateway", "--port", str(port)]
        try:
            async with service("gateway", args, env, data_dir) as gateway:
                normal, cut, drained, purged = await cut_and_drain(
                    context,
                    gateway,
                    gateway_url,
                    (link, amqp_url),
                    (normal_file, cut_file),
                )
                high_water = tree_high_water(gateway.watch())
        finally:
            await link.restore()
        queued = await purge(amqp_url, queue_for("video"))

    if purged < normal.packets or queued < cut.packets:
        raise BenchmarkError(
            f"the queue held {purged} packets after the send with the link up and "
            f"{queued} after the drain, but {normal.packets} and {cut.packets} were "
            "accepted; packets were lost"
        )
    return outbox_figures(context, normal, cut, drained, high_water, queued)


async def cut_and_drain(
    context: RunContext,
    gateway: Service,
    gateway_url: str,
    link: tuple[VhostLink, str],
    files: tuple[Path, Path],
) -> tuple[Accepting, Accepting, Drain, int]:
    """The two sends and the drain; also how many packets the first left queued.

    `link` is the gateway's way into its vhost, and that vhost's URL.
    """
    vhost_link, amqp_url = link
    normal_file, cut_file = files
    deadline = time.monotonic() + READY_TIMEOUT
    await wait_healthy(gateway, gateway_url, deadline)
    async with aiohttp.ClientSession() as session:
        health = Health(session, gateway_url, gateway)
        await health.until(lambda h: h["broker"] == "up", "the broker link is up")
        normal = await accept(context, gateway, gateway_url, normal_file)
        if buffered := normal.sent.packets("packets_buffered"):
            raise BenchmarkError(
                f"with the broker link up, {buffered} of {normal.packets} packets "
                "went to the outbox (202), so the gateway's normal rate was not "
                "measured; was RabbitMQ restarted or overloaded? run it again"
            )

        # Workers would have taken these by now; left in the queue, they would
        # make the broker slower for the drain than for the bare ceiling,
        # which publishes into an empty queue.
        purged = await purge(amqp_url, queue_for("video"))

        await vhost_link.cut()
        await health.until(lambda h: h["broker"] == "down", "the link is down")
        log.info("bench.outbox_link", state="cut", normal_rate=round(normal.rate()))
        cut = await accept(context, gateway, gateway_url, cut_file)
        buffered = cut.sent.packets("packets_buffered")
        if buffered != cut.packets:
            raise BenchmarkError(
                f"with the broker link cut, {cut.packets - buffered} of "
                f"{cut.packets} packets were not answered 202 (buffered)"
            )
        held = await health.read()
        if held["outbox"]["packets"] != cut.packets:
            raise BenchmarkError(
                f"the gateway answered 202 for {cut.packets} packets but its "
                f"outbox holds {held['outbox']['packets']}"
            )

        drained = await drain(health, gateway, vhost_link, held["outbox"])
    return normal, cut, drained, purged


async def accept(
    context: RunContext, gateway: Service, gateway_url: str, path: Path
) -> Accepting:
    options = context.options
    async with driver(
        "burst",
        [path],
        gateway_url=gateway_url,
        data_type="video",
        chunk=flag_name(options.outbox_chunk),
        work_dir=options.work_dir,
        timeout=options.timeout,
    ) as sender:
        meter = CpuMeter({"sender": sender.process} | busy(gateway), self_label=None)
        with meter.measure(), sampled({"gateway": gateway.watch()}) as sampler:
            await sender.go()
            sent = await sender.result()
    gateway.check_alive()
    return Accepting(sent, meter.cores(), sampler.peaks["gateway"])


def busy(gateway: Service) -> dict[str, psutil.Process]:
    """The processes whose CPU time each step reports, beside the harness's."""
    broker = broker_process()
    return {"gateway": gateway.watch()} | ({"broker": broker} if broker else {})


async def drain(
    health: Health, gateway: Service, link: VhostLink, held: dict[str, Any]
) -> Drain:
    """Give the link back; time the reconnect and the drain to empty."""
    meter = CpuMeter(busy(gateway), self_label=None)
    await link.restore()
    passed = time.perf_counter()
    up = await health.until(lambda h: h["broker"] == "up", "the link is back")
    log.info("bench.outbox_link", state="back", packets=held["packets"])
    with meter.measure(), sampled({"gateway": gateway.watch()}) as sampler:
        empty = await health.until(
            lambda h: h["outbox"]["packets"] == 0, "the outbox is empty"
        )
    return Drain(
        int(held["packets"]),
        up - passed,
        empty - up,
        meter.cores(),
        sampler.peaks["gateway"],
    )


class Health:
    """Polls the gateway's /healthz; errors name what never came."""

    def __init__(
        self, session: aiohttp.ClientSession, gateway_url: str, gateway: Service
    ) -> None:
        self.session = session
        self.url = f"{gateway_url}/healthz"
        self.gateway = gateway

    async def read(self) -> dict[str, Any]:
        async with self.session.get(self.url) as response:
            document: dict[str, Any] = await response.json()
            return document

    async def until(self, wanted: Callable[[dict[str, Any]], bool], what: str) -> float:
        """Poll until `wanted` holds; the instant it was first seen to hold."""
        deadline = time.monotonic() + LINK_TIMEOUT
        while True:
            self.gateway.check_alive()
            if wanted(await self.read()):
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"the gateway's /healthz never showed that {what} within "
                    f"{LINK_TIMEOUT:g} s; its log:\n{self.gateway.tail()}"
                )
            await asyncio.sleep(POLL_SECONDS)


async def purge(amqp_url: str, queue_name: str) -> int:
    """Empty the queue straight at the broker; how many packets it held.

    A message may carry several packets (a bundle says how many in
    `dh-packets`), so the messages are read, not just counted.
    """
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        packets = 0
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            packets += int((message.headers or {}).get("dh-packets", 1))
        return packets
    finally:
        await connection.close()


def outbox_figures(
    context: RunContext,
    normal: Accepting,
    cut: Accepting,
    drained: Drain,
    high_water: int,
    queued: int,
) -> list[Figure]:
    options = context.options
    queue, chunk = options.queue_type, options.outbox_chunk
    chunk_name = size_name(chunk)
    file_name = size_name(options.outbox_size)
    figures = []
    for key, run, how in (
        ("normal", normal, "broker link up, every packet published (200)"),
        ("accept", cut, "broker link cut, every packet answered 202 (outbox)"),
    ):
        rate = run.rate()
        first, last = run.sent.answer_window()
        figures.append(
            Figure(
                f"outbox/{key}/{queue}/{chunk}",
                f"gateway accept rate, {how.split(',')[0]}, {chunk_name} packets",
                rate,
                "packets/s",
                f"{run.packets} packets of a {file_name} file, {how}; "
                f"{rate * chunk / MB:.1f} MB/s from the first to the last 2xx "
                f"({last - first:.2f} s; the sender's whole send, hashing "
                f"included, {run.sent.finished - run.sent.started:.2f} s); "
                f"{run.cores}",
            )
        )
    figures.append(
        Figure(
            f"outbox/drain/{queue}/{chunk}",
            f"outbox drain once the link is back, {chunk_name} packets",
            drained.packets / drained.drain_seconds,
            "packets/s",
            f"{drained.packets} packets "
            f"({mb_per_s(options.outbox_size, drained.drain_seconds):.1f} MB/s) "
            f"forwarded in {drained.drain_seconds:.2f} s from the link's "
            f"return (/healthz polled every {POLL_SECONDS * 1000:.0f} ms; the "
            f"reconnect took {drained.reconnect_seconds:.2f} s and is not counted); "
            f"the queue then held {queued} packets (emptied after the send with "
            f"the link up); {drained.cores}",
        )
    )
    peaks = {
        "accepting with the link up": normal.peak_rss,
        "accepting into the outbox": cut.peak_rss,
        "draining": drained.peak_rss,
    }
    figures.append(
        Figure(
            f"mem/gateway/outbox-{chunk}",
            f"gateway peak RSS, outbox part, {chunk_name} packets",
            max(peaks.values()) / MB,
            "MB",
            "sampled every 50 ms, children included; "
            + ", ".join(f"{what} {peak / MB:.1f} MB" for what, peak in peaks.items())
            + f"; kernel VmHWM sum {high_water / MB:.1f} MB",
        )
    )
    return figures
