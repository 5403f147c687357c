"""Measure a three-node cluster on this machine: the figures in docs/deployment.md.

Not a test (pytest does not collect it); run it on a quiet machine:

    uv run python tests/cluster/measure_cluster.py            # everything
    uv run python tests/cluster/measure_cluster.py --quick    # a smoke run

Two parts, each printing one table row per run:

- bare: a minimal aio-pika client publishes persistent messages to one
  quorum queue with up to 256 confirms in flight, while a second connection
  consumes them with acks (prefetch 64); both are connected to the queue's
  leader. Once with one replica (x-quorum-initial-group-size 1), once with
  three. The CPU seconds of each node's Erlang VM are counted, so that the
  cost of a replica is known apart from the rest.
- pipeline: a gateway and W workers (own local directories, PostgreSQL
  catalog, a shared blob directory) on the cluster, one video sent through
  the sender; CPU seconds of every process per MB moved.

All three nodes, the client and the datahaul processes share this
machine's cores, so the wall-clock rates are what one host with all of it
on it does; the CPU seconds per MB are what carries over to separate hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import psutil
import psycopg
from aio_pika.abc import AbstractIncomingMessage
from psycopg import sql

from datahaul.faults.cluster import RabbitCluster
from datahaul.faults.processes import ServiceProcess, free_port
from datahaul.sender import Sender
from datahaul.storage.catalog import Catalog

KiB = 1024
MiB = 1024 * KiB
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
PG_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/"
WINDOW = 256
PREFETCH = 64


@dataclass
class Cpu:
    """CPU seconds of a set of processes since the meter was made."""

    processes: list[psutil.Process]
    children: bool
    start: float = 0.0

    @classmethod
    def of(cls, pids: list[int], *, children: bool = True) -> Cpu:
        meter = cls([psutil.Process(pid) for pid in pids], children)
        meter.start = meter.total()
        return meter

    def total(self) -> float:
        seconds = 0.0
        for process in self.processes:
            # This script's own children are the nodes and the services,
            # counted on their own.
            family = process.children(recursive=True) if self.children else []
            for each in (process, *family):
                try:
                    times = each.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                seconds += times.user + times.system
        return seconds

    def used(self) -> float:
        return self.total() - self.start


def node_pids(cluster: RabbitCluster) -> dict[str, int]:
    return {
        node.name.split("-")[0]: node.process.pid
        for node in cluster.nodes
        if node.process is not None
    }


async def bare_run(
    cluster: RabbitCluster, replicas: int, size: int, count: int
) -> dict[str, float]:
    """Publish and consume count messages of size bytes; rates and CPU."""
    leader = cluster.first
    queue_name = f"measure-{secrets.token_hex(3)}"
    publisher = await aio_pika.connect(leader.url())
    consumer = await aio_pika.connect(leader.url())
    try:
        channel = await publisher.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            queue_name,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-quorum-initial-group-size": replicas,
            },
        )
        meters = {name: Cpu.of([pid]) for name, pid in node_pids(cluster).items()}
        client = Cpu.of([os.getpid()], children=False)
        started = time.monotonic()
        consumed = asyncio.create_task(consume(consumer, queue_name, count))
        await publish(channel, queue_name, size, count)
        await consumed
        seconds = time.monotonic() - started
        await consumer.close()
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await publisher.close()
        await consumer.close()

    row: dict[str, float] = {
        "msg/s": count / seconds,
        "MB/s": count * size / seconds / 1e6,
        "client": client.used(),
    }
    row.update({name: meter.used() for name, meter in meters.items()})
    return row


async def publish(
    channel: aio_pika.abc.AbstractChannel, queue: str, size: int, count: int
) -> None:
    body = os.urandom(size)
    slots = asyncio.Semaphore(WINDOW)
    pending: set[asyncio.Task[object]] = set()

    async def one() -> object:
        try:
            return await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                queue,
                mandatory=True,
            )
        finally:
            slots.release()

    for _ in range(count):
        await slots.acquire()
        task = asyncio.create_task(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)


async def consume(
    connection: aio_pika.abc.AbstractConnection, queue_name: str, count: int
) -> None:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.get_queue(queue_name)
    done = asyncio.Event()
    seen = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal seen
        await message.ack()
        seen += 1
        if seen >= count:
            done.set()

    await queue.consume(on_message)
    await done.wait()


@contextmanager
def database() -> Iterator[str]:
    name = f"datahaul_measure_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield PG_SERVER_URL + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


def pipeline_run(
    cluster: RabbitCluster, workers: int, size: int, work: Path
) -> dict[str, float]:
    """One video of size bytes through a gateway and W workers; rate and CPU/MB."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    source = run_dir / "video.mp4"
    source.write_bytes(os.urandom(size))
    shared = run_dir / "shared"
    port = free_port()
    processes: list[ServiceProcess] = []
    with database() as catalog_url:
        env = {
            "DATAHAUL_AMQP_URL": cluster.amqp_url(first=1),
            "DATAHAUL_DATA_DIR": str(run_dir / "gateway"),
            "DATAHAUL_CATALOG_URL": catalog_url,
            "DATAHAUL_BLOB_URL": (shared / "blobs").as_uri(),
            "DATAHAUL_STAGING_URL": (shared / "staging").as_uri(),
        }
        try:
            gateway = ServiceProcess.gateway(port, env, run_dir / "logs")
            processes.append(gateway.start().wait_ready())
            for index in range(workers):
                own = {**env, "DATAHAUL_DATA_DIR": str(run_dir / f"host-{index}")}
                worker = ServiceProcess.worker(
                    "video",
                    own,
                    run_dir / "logs",
                    name=f"worker-{index}",
                    consumers_expected=lambda queue, n=index + 1: n,
                )
                processes.append(worker.start().wait_ready())
            return measure_send(cluster, processes, source, catalog_url, gateway)
        finally:
            for process in processes:
                if process.is_running:
                    process.terminate()


def measure_send(
    cluster: RabbitCluster,
    processes: list[ServiceProcess],
    source: Path,
    catalog_url: str,
    gateway: ServiceProcess,
) -> dict[str, float]:
    size = source.stat().st_size
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    meters = {p.name: Cpu.of([p.pid or 0]) for p in processes}
    brokers = Cpu.of(list(node_pids(cluster).values()))
    client = Cpu.of([os.getpid()], children=False)
    started = time.monotonic()

    async def send() -> str:
        async with Sender(gateway.url or "") as sender:
            result = await sender.send_file(source, type="video", chunk_size=256 * KiB)
        return result.file_id

    file_id = asyncio.run(send())
    wait_stored(catalog_url, file_id, expected)
    seconds = time.monotonic() - started

    megabytes = size / 1e6
    row = {"MB/s": megabytes / seconds, "sender": client.used() / megabytes}
    row["gateway"] = meters.pop("gateway").used() / megabytes
    row["workers"] = sum(meter.used() for meter in meters.values()) / megabytes
    row["brokers"] = brokers.used() / megabytes
    return row


def wait_stored(catalog_url: str, file_id: str, sha256: str) -> None:
    catalog = Catalog.open(catalog_url)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            record = catalog.get(file_id)
            if record is not None and record.state == "stored":
                if record.sha256 != sha256:
                    raise SystemExit(f"stored SHA-256 {record.sha256} != {sha256}")
                return
            time.sleep(0.05)
        raise SystemExit(f"{file_id} was not stored within 600 s")
    finally:
        catalog.close()


def show(title: str, row: dict[str, float]) -> None:
    cells = "  ".join(f"{key} {value:,.3g}" for key, value in row.items())
    print(f"{title:<34} {cells}", flush=True)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="small sizes, one round")
    cli.add_argument("--rounds", type=int, default=2)
    args = cli.parse_args()
    rounds = 1 if args.quick else args.rounds
    big = (64 if args.quick else 256) * MiB
    small = 5_000 if args.quick else 20_000
    video = (32 if args.quick else 128) * MiB

    work = Path(tempfile.mkdtemp(prefix="datahaul-measure-"))
    try:
        with RabbitCluster(work / "cluster") as cluster:
            print(f"cluster {[n.nodename for n in cluster.nodes]}", flush=True)
            for _ in range(rounds):
                for replicas in (1, 3):
                    for size, count in ((256 * KiB, big // (256 * KiB)), (KiB, small)):
                        row = asyncio.run(bare_run(cluster, replicas, size, count))
                        show(f"bare {size // KiB} KiB, {replicas} replica(s)", row)
            for _ in range(rounds):
                for workers in (1, 2):
                    row = pipeline_run(cluster, workers, video, work)
                    show(f"pipeline {video // MiB} MiB, {workers} worker(s)", row)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
