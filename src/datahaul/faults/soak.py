"""The soak run: many simulated robots for a while, with random faults.

It starts its own gateway and workers (in a vhost and a data folder of its
own), puts the fault proxy between the gateway and RabbitMQ, and lets
robots send files of every type and size while faults strike at random:
stalled and cut broker links, workers and the gateway killed with
`kill -9`, and RabbitMQ itself stopped and started. At the end it waits for
the pipeline to settle and counts every file sent: stored intact, lost,
duplicated or corrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import structlog

from datahaul.errors import DatahaulError
from datahaul.faults.processes import ServiceProcess, free_port
from datahaul.faults.proxy import FaultProxy
from datahaul.faults.rabbit import (
    create_vhost,
    delete_vhost,
    ensure_running,
    rabbitmq_down,
)
from datahaul.sender import Sender
from datahaul.storage.catalog import Catalog

log = structlog.get_logger("datahaul.soak")

BROKER_ROOT = "amqp://guest:guest@127.0.0.1:5672/"
FILE_TYPES = {"text": ".log", "image": ".jpg", "video": ".mp4"}


@dataclass
class SoakReport:
    seconds: float
    sent: int = 0
    stored: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.corrupted)

    def to_json(self) -> dict[str, object]:
        return {
            "seconds": round(self.seconds, 1),
            "files_sent": self.sent,
            "bytes_sent": self.bytes_sent,
            "stored_intact": self.stored,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "corrupted": len(self.corrupted),
            "faults": self.faults,
            "lost_ids": self.lost[:20],
            "duplicated_ids": self.duplicated[:20],
            "corrupted_ids": self.corrupted[:20],
        }


@dataclass
class SoakPlan:
    seconds: float
    robots: int = 6
    workers: int = 2
    largest_file: int = 4 * 1024 * 1024
    fault_every: float = 8.0
    broker_restarts: bool = True
    seed: int = field(default_factory=lambda: secrets.randbits(32))


class Soak:
    def __init__(self, plan: SoakPlan, folder: Path) -> None:
        self.plan = plan
        self.folder = folder
        self.rng = random.Random(plan.seed)
        self.vhost = f"datahaul-soak-{secrets.token_hex(4)}"
        self.amqp_url = BROKER_ROOT + quote(self.vhost, safe="")
        self.port = free_port()
        self.sent: dict[str, tuple[str, int]] = {}
        self.faults: dict[str, int] = {}
        self.proxy: FaultProxy | None = None
        self.gateway: ServiceProcess | None = None
        self.workers: list[ServiceProcess] = []

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def catalog_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'catalog.db'}"

    async def run(self) -> SoakReport:
        started = time.monotonic()
        create_vhost(self.vhost)
        try:
            self._start_services()
            stop = time.monotonic() + self.plan.seconds
            robots = [
                asyncio.create_task(self._robot(i, stop))
                for i in range(self.plan.robots)
            ]
            faults = asyncio.create_task(self._faults(stop))
            await asyncio.gather(*robots)
            faults.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await faults
            await self._heal()
            report = await asyncio.to_thread(self._settle_and_count, 300.0)
        finally:
            self._stop_services()
            ensure_running()
            delete_vhost(self.vhost)
        report.seconds = time.monotonic() - started
        return report

    def _env(self) -> dict[str, str]:
        return {
            "DATAHAUL_AMQP_URL": self.amqp_url,
            "DATAHAUL_DATA_DIR": str(self.data_dir),
            "DATAHAUL_CATALOG_URL": self.catalog_url,
            "DATAHAUL_CONFIRM_TIMEOUT": "5",
            "DATAHAUL_LEASE_SECONDS": "10",
            "DATAHAUL_SWEEP_INTERVAL": "2",
        }

    def _start_services(self) -> None:
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.proxy = FaultProxy.for_url(self.amqp_url)
        gateway_env = {
            **self._env(),
            "DATAHAUL_AMQP_URL": self.proxy.url_for(self.amqp_url),
        }
        self.gateway = ServiceProcess.gateway(
            self.port, gateway_env, logs, healthy_only=False
        )
        self.gateway.start().wait_ready()
        for index in range(self.plan.workers):
            worker = ServiceProcess.worker(
                "all",
                self._env(),
                logs,
                name=f"worker-{index + 1}",
                consumers_expected=self._running_workers,
            )
            self.workers.append(worker)
            worker.start().wait_ready()

    def _running_workers(self, queue: str) -> int:
        """Consumers each queue shows once every running worker is up."""
        return sum(1 for worker in self.workers if worker.is_running)

    def _stop_services(self) -> None:
        for process in [*self.workers, *([self.gateway] if self.gateway else [])]:
            if process.is_running:
                process.terminate()
        if self.proxy is not None:
            self.proxy.close()

    async def _robot(self, number: int, stop: float) -> None:
        """Send files until the time is up; a failed send is retried (resumed)."""
        rng = random.Random(self.plan.seed + number)
        folder = self.folder / f"robot-{number}"
        folder.mkdir(parents=True, exist_ok=True)
        async with Sender(f"http://127.0.0.1:{self.port}", concurrency=4) as sender:
            while time.monotonic() < stop:
                path, kind = _make_file(folder, rng, self.plan.largest_file)
                await self._send_until_accepted(sender, path, kind, stop + 120)
                path.unlink()

    async def _send_until_accepted(
        self, sender: Sender, path: Path, kind: str, give_up: float
    ) -> None:
        chunk = random.choice(["16K", "64K", "256K"])
        # Taken here, not from the sender: the file's bytes are the truth the
        # stored copy is judged against.
        sha256 = await asyncio.to_thread(_sha256_of, path)
        while time.monotonic() < give_up:
            try:
                result = await sender.send_file(path, type=kind, chunk_size=chunk)
            except DatahaulError as exc:
                log.debug("soak.send_retry", path=path.name, error=str(exc))
                await asyncio.sleep(1.0)
                continue
            self.sent[result.file_id] = (sha256, result.size)
            return
        log.warning("soak.send_abandoned", path=path.name)

    async def _faults(self, stop: float) -> None:
        actions: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("link_stalled", self._stall_link),
            ("link_cut", self._cut_link),
            ("worker_killed", self._kill_worker),
            ("gateway_killed", self._kill_gateway),
        ]
        if self.plan.broker_restarts:
            actions.append(("broker_restarted", self._restart_broker))
        while time.monotonic() < stop:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.plan.fault_every)
            if time.monotonic() >= stop:
                return
            name, action = self.rng.choice(actions)
            log.info("soak.fault", fault=name)
            self.faults[name] = self.faults.get(name, 0) + 1
            await action()

    async def _stall_link(self) -> None:
        assert self.proxy is not None
        self.proxy.stall()
        await asyncio.sleep(self.rng.uniform(2, 8))
        self.proxy.pass_through()

    async def _cut_link(self) -> None:
        assert self.proxy is not None
        self.proxy.cut()

    async def _kill_worker(self) -> None:
        worker = self.rng.choice(self.workers)
        worker.kill9()
        await asyncio.sleep(self.rng.uniform(0.5, 3))
        await asyncio.to_thread(worker.restart)

    async def _kill_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.kill9()
        await asyncio.sleep(self.rng.uniform(0.5, 2))
        await asyncio.to_thread(self.gateway.restart)

    async def _restart_broker(self) -> None:
        async with rabbitmq_down():
            await asyncio.sleep(self.rng.uniform(2, 6))

    async def _heal(self) -> None:
        assert self.proxy is not None
        assert self.gateway is not None
        self.proxy.pass_through()
        ensure_running()
        for process in [self.gateway, *self.workers]:
            if not process.is_running:
                await asyncio.to_thread(process.restart)

    def _settle_and_count(self, timeout: float) -> SoakReport:
        report = SoakReport(
            0.0,
            sent=len(self.sent),
            bytes_sent=sum(size for _, size in self.sent.values()),
            faults=dict(self.faults),
        )
        catalog = Catalog.open(self.catalog_url)
        try:
            self._wait_settled(catalog, timeout)
            for file_id, (sha256, _) in self.sent.items():
                self._judge(catalog, file_id, sha256, report)
        finally:
            catalog.close()
        return report

    def _wait_settled(self, catalog: Catalog, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = catalog.states(list(self.sent))
            if len(states) == len(self.sent) and all(
                s in ("stored", "failed") for s in states.values()
            ):
                return
            time.sleep(1.0)

    def _judge(
        self, catalog: Catalog, file_id: str, sha256: str, report: SoakReport
    ) -> None:
        record = catalog.get(file_id)
        if record is None or record.state != "stored":
            report.lost.append(file_id)
            return
        if record.type != "text":
            folder = self.data_dir / "blobs" / record.type / file_id[:2] / file_id
            objects = [p for p in folder.iterdir() if not p.name.startswith(".")]
            if len(objects) != 1:
                report.duplicated.append(file_id)
                return
            content_sha = _sha256_of(objects[0])
        else:
            content_sha = hashlib.sha256(catalog.text(file_id) or b"").hexdigest()
        if record.sha256 != sha256 or content_sha != sha256:
            report.corrupted.append(file_id)
            return
        report.stored += 1


def _make_file(folder: Path, rng: random.Random, largest: int) -> tuple[Path, str]:
    kind = rng.choice(list(FILE_TYPES))
    size = int(rng.paretovariate(1.1) * 20_000) % largest + 1
    path = folder / f"{secrets.token_hex(6)}{FILE_TYPES[kind]}"
    if kind == "text":
        line = f"robot telemetry {rng.random():.6f}\n".encode()
        path.write_bytes((line * (size // len(line) + 1))[:size])
    else:
        path.write_bytes(rng.randbytes(size))
    return path, kind


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def soak(plan: SoakPlan, folder: Path | None = None) -> SoakReport:
    """Run a soak in `folder` (a fresh temporary one by default)."""
    if folder is not None:
        return await Soak(plan, folder).run()
    with tempfile.TemporaryDirectory(prefix="datahaul-soak-") as temporary:
        return await Soak(plan, Path(temporary)).run()
