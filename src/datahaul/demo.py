"""`datahaul demo`: the whole pipeline on one machine, in one command.

It starts a gateway and two workers against the local RabbitMQ, sends
generated text, image and video files, waits for each file's "file stored"
event, and shows where each file landed and whether its SHA-256 matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import msgspec

from datahaul.broker import topology
from datahaul.broker.connection import NodeRing
from datahaul.config import Settings
from datahaul.errors import DatahaulError
from datahaul.sender import Sender, SendResult

KiB = 1024
MiB = 1024 * KiB

# (file name, size): several sizes of each type, small enough for a laptop.
SAMPLES = [
    ("telemetry.log", 6 * KiB),
    ("mission-log.txt", 3 * MiB // 2),
    ("front-camera.jpg", 180 * KiB),
    ("lidar-frame.png", 3 * MiB),
    ("dashcam-short.mp4", 8 * MiB),
    ("dashcam-long.mp4", 64 * MiB),
]


@dataclass
class DemoRow:
    path: Path
    source_sha256: str
    sent: SendResult | None = None
    event: dict[str, Any] | None = None

    @property
    def verified(self) -> bool:
        return self.event is not None and self.event.get("sha256") == self.source_sha256


class Services:
    """The gateway and worker processes the demo starts and always stops."""

    def __init__(
        self, settings: Settings, port: int, workers: int, center_port: int
    ) -> None:
        self.settings = settings
        self.port = port
        self.center_port = center_port
        self.workers = workers
        self.logs = settings.data_dir / "demo-logs"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._spawn("center", ["center", "--port", str(self.center_port)])
        self._spawn("gateway", ["gateway", "--port", str(self.port)])
        for index in range(self.workers):
            self._spawn(f"worker-{index + 1}", ["worker", "--type", "all"])

    def _spawn(self, name: str, arguments: list[str]) -> None:
        env = dict(
            os.environ,
            DATAHAUL_DATA_DIR=str(self.settings.data_dir),
            DATAHAUL_AMQP_URL=self.settings.amqp_url,
            DATAHAUL_CATALOG_URL=self.settings.catalog_url,
        )
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "datahaul", *arguments],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        log.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        gateway = f"http://127.0.0.1:{self.port}/healthz"
        center = f"http://127.0.0.1:{self.center_port}/v1/live"
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                self._check_alive()
                if await _answers(session, gateway, broker="up") and await _answers(
                    session, center
                ):
                    return
                await asyncio.sleep(0.2)
        raise DatahaulError(
            f"the gateway or the center did not become ready; see {self.logs}"
        )

    def _check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise DatahaulError(
                    f"a demo process exited with code {process.returncode}; "
                    f"see the logs in {self.logs}"
                )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _answers(session: aiohttp.ClientSession, url: str, **expected: str) -> bool:
    """Whether url answers 200 with a JSON body holding the expected values."""
    with contextlib.suppress(aiohttp.ClientError, ValueError):
        async with session.get(url) as answer:
            if answer.status != 200:
                return False
            body = await answer.json()
            return all(body.get(key) == value for key, value in expected.items())
    return False


async def run_demo(
    settings: Settings,
    port: int,
    workers: int,
    center_port: int,
    stay: Callable[[list[DemoRow]], Awaitable[None]] | None = None,
) -> list[DemoRow]:
    """Start everything, send the samples, wait for them to be stored; then,
    if `stay` is given, keep everything running until it returns."""
    await _check_broker(settings)
    rows = [DemoRow(path, _sha256(path)) for path in make_samples(settings.data_dir)]
    services = Services(settings, port, workers, center_port)
    services.start()
    try:
        await services.wait_ready()
        events = await _subscribe(settings)
        async with events.connection:
            async with Sender(f"http://127.0.0.1:{port}", concurrency=8) as sender:
                results = await sender.send_files([row.path for row in rows])
            for row, result in zip(rows, results, strict=True):
                if isinstance(result, DatahaulError):
                    raise result
                row.sent = result
            await events.collect(rows, timeout=120.0)
        if stay is not None:
            await stay(rows)
    finally:
        services.stop()
    return rows


def make_samples(data_dir: Path) -> list[Path]:
    """Generated text logs and random image and video bytes of several sizes."""
    folder = data_dir / "demo-source"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, size in SAMPLES:
        path = folder / name
        with open(path, "wb") as handle:
            for block in (
                _log_lines(size)
                if name.endswith((".log", ".txt"))
                else _random_bytes(size)
            ):
                handle.write(block)
        paths.append(path)
    return paths


def _log_lines(size: int) -> Iterator[bytes]:
    rng = random.Random()
    written = 0
    while written < size:
        line = (
            f"{time.time():.3f} robot-7 speed={rng.uniform(0, 3):.2f} "
            f"battery={rng.randint(20, 100)} pose=({rng.random():.4f},"
            f"{rng.random():.4f})\n"
        ).encode()
        line = line[: size - written]
        written += len(line)
        yield line


def _random_bytes(size: int) -> Iterator[bytes]:
    left = size
    while left:
        block = os.urandom(min(left, MiB))
        left -= len(block)
        yield block


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(MiB):
            digest.update(block)
    return digest.hexdigest()


async def _check_broker(settings: Settings) -> None:
    connection = await NodeRing(settings.amqp_urls, "datahaul-demo-check").connect()
    await connection.close()


class _EventFeed:
    def __init__(
        self,
        connection: aio_pika.abc.AbstractConnection,
        queue: aio_pika.abc.AbstractQueue,
    ) -> None:
        self.connection = connection
        self.queue = queue

    async def collect(self, rows: list[DemoRow], timeout: float) -> None:
        wanted = {row.sent.file_id: row for row in rows if row.sent is not None}
        deadline = time.monotonic() + timeout
        async with self.queue.iterator() as messages:
            while any(row.event is None for row in wanted.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    message = await asyncio.wait_for(messages.__anext__(), left)
                except TimeoutError:
                    return
                async with message.process():
                    event = msgspec.json.decode(message.body)
                    if event.get("file_id") in wanted:
                        wanted[event["file_id"]].event = event


async def _subscribe(settings: Settings) -> _EventFeed:
    connection = await NodeRing(settings.amqp_urls, "datahaul-demo").connect()
    channel = await connection.channel()
    await topology.declare(channel, settings)
    exchange = await channel.get_exchange(topology.EVENT_EXCHANGE)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key="file.#")
    return _EventFeed(connection, queue)


def free_port(preferred: int) -> int:
    """The preferred port if it is free, else any free one."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise DatahaulError("no free TCP port on 127.0.0.1")
