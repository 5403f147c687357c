"""The long-running programs: gateway, worker, and the topology they share."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import aio_pika
import typer

from datahaul.broker import topology
from datahaul.broker.connection import NodeRing
from datahaul.cli.common import ExitCode, fail, freeze_startup_heap, keep_large_buffers
from datahaul.config import Settings
from datahaul.errors import DatahaulError
from datahaul.protocol.packet import DATA_TYPES
from datahaul.worker.consumer import Worker

AMQP_URL = typer.Option(
    None,
    "--amqp-url",
    metavar="URL",
    help="Broker URL; repeat the flag, or separate URLs by commas, for the "
    "nodes of a cluster (env DATAHAUL_AMQP_URL; default "
    "amqp://guest:guest@127.0.0.1:5672/)",
)
DATA_DIR = typer.Option(
    None,
    "--data-dir",
    help="Local data (env DATAHAUL_DATA_DIR; default ./datahaul-data)",
)
CATALOG_URL = typer.Option(
    None,
    "--catalog-url",
    help="sqlite:///PATH or postgresql://... (env DATAHAUL_CATALOG_URL)",
)
QUEUE_TYPE = typer.Option(
    None, "--queue-type", help="quorum (default) or classic (env DATAHAUL_QUEUE_TYPE)"
)


def register(app: typer.Typer) -> None:
    app.command()(gateway)
    app.command()(worker)
    app.command("topology")(declare_topology)


def gateway(
    port: int | None = typer.Option(None, "--port", help="Port (default 8080)"),
    host: str | None = typer.Option(None, "--host", help="Address (default 127.0.0.1)"),
    amqp_url: list[str] | None = AMQP_URL,
    data_dir: Path | None = DATA_DIR,
    queue_type: str | None = QUEUE_TYPE,
) -> None:
    """Run the vehicle gateway: HTTP in, RabbitMQ out, an outbox in between."""
    from datahaul.gateway.app import run

    settings = _settings(
        amqp_url=joined_urls(amqp_url),
        data_dir=data_dir,
        queue_type=queue_type,
        gateway_port=port,
        gateway_host=host,
    )
    freeze_startup_heap()
    keep_large_buffers()
    run(settings)


def worker(
    type: str = typer.Option("all", "--type", help="text, image, video or all"),
    amqp_url: list[str] | None = AMQP_URL,
    data_dir: Path | None = DATA_DIR,
    catalog_url: str | None = CATALOG_URL,
    queue_type: str | None = QUEUE_TYPE,
    metrics_port: int | None = typer.Option(
        None,
        "--metrics-port",
        help="Serve Prometheus /metrics on this port; 0 picks one (default off)",
    ),
    metrics_host: str = typer.Option(
        "127.0.0.1", "--metrics-host", help="Address of /metrics (default 127.0.0.1)"
    ),
) -> None:
    """Run a worker: consume packets, assemble files, store them."""
    types = list(DATA_TYPES) if type == "all" else [type]
    if any(t not in DATA_TYPES for t in types):
        raise fail(
            f"--type must be one of text, image, video, all; got {type!r}",
            ExitCode.USAGE,
        )
    settings = _settings(
        amqp_url=joined_urls(amqp_url),
        data_dir=data_dir,
        catalog_url=catalog_url,
        queue_type=queue_type,
    )
    if metrics_port is not None:
        _serve_metrics(metrics_host, metrics_port)
    freeze_startup_heap()
    keep_large_buffers()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run_until_signalled(Worker(settings, types)))
    except DatahaulError as exc:
        raise fail(str(exc)) from None


async def _run_until_signalled(worker: Worker) -> None:
    """Run the worker; SIGTERM stops it like Ctrl-C (unacked packets return)."""
    task = asyncio.create_task(worker.run())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def declare_topology(
    amqp_url: list[str] | None = AMQP_URL,
    queue_type: str | None = QUEUE_TYPE,
) -> None:
    """Declare the exchanges and queues (safe to run again at any time)."""
    settings = _settings(amqp_url=joined_urls(amqp_url), queue_type=queue_type)

    async def declare() -> None:
        connection = await NodeRing(settings.amqp_urls, "datahaul-topology").connect()
        async with connection:
            await topology.declare(await connection.channel(), settings)

    try:
        asyncio.run(declare())
    except (DatahaulError, aio_pika.exceptions.AMQPError) as exc:
        raise fail(
            f"could not declare the topology: {exc}", ExitCode.UNAVAILABLE
        ) from None
    names = ", ".join(topology.QUEUES.values())
    typer.echo(
        f"declared {topology.PACKET_EXCHANGE} -> {names} "
        f"({settings.queue_type}), {topology.DEAD_QUEUE}, "
        f"{topology.EVENT_EXCHANGE}"
    )


def _serve_metrics(host: str, port: int) -> None:
    from datahaul import metrics

    try:
        metrics.serve_in_thread(host, port, metrics.WORKER)
    except OSError as exc:
        raise fail(
            f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; "
            "choose another --metrics-port",
            ExitCode.UNAVAILABLE,
        ) from None


def joined_urls(urls: list[str] | None) -> str | None:
    """Repeated --amqp-url flags as the comma-separated list Settings takes."""
    return ",".join(urls) if urls else None


def _settings(**overrides: object) -> Settings:
    try:
        return Settings.load(**overrides)
    except DatahaulError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
