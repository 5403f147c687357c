"""`datahaul demo`: run the whole pipeline on generated files and show the result."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from datahaul.cli.common import ExitCode, fail
from datahaul.cli.services import AMQP_URL, DATA_DIR, joined_urls
from datahaul.config import Settings
from datahaul.errors import DatahaulError


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    port: int = typer.Option(8080, "--port", help="Gateway port (another if busy)."),
    workers: int = typer.Option(2, "--workers", help="Worker processes to start."),
    amqp_url: list[str] | None = AMQP_URL,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Start a gateway and workers, send sample files, show where they landed."""
    from datahaul.demo import free_port, run_demo

    console = Console(width=max(Console().width, 160))
    settings = Settings.load(amqp_url=joined_urls(amqp_url), data_dir=data_dir)
    port = free_port(port)
    console.print(
        f"datahaul demo: gateway on http://127.0.0.1:{port}, {workers} "
        f"workers, data in {settings.data_dir}"
    )
    try:
        rows = asyncio.run(run_demo(settings, port, workers))
    except DatahaulError as exc:
        raise fail(
            f"{exc}. Is RabbitMQ running? (rabbitmq-server -detached)",
            ExitCode.UNAVAILABLE,
        ) from None

    table = Table(
        "file", "type", "size", "file id", "packets", "stored at", "sha256 matches"
    )
    for row in rows:
        sent, event = row.sent, row.event or {}
        table.add_row(
            row.path.name,
            sent.type if sent else "",
            f"{sent.size:,}" if sent else "",
            sent.file_id if sent else "",
            str(sent.total_seq) if sent else "",
            str(event.get("location") or event.get("state") or "not stored"),
            "yes" if row.verified else "NO",
        )
    console.print(table)
    if not all(row.verified for row in rows):
        raise fail(
            "some files were not stored intact; see the table above", ExitCode.MISMATCH
        )
    console.print(
        f"all {len(rows)} files stored and verified; "
        f"try `datahaul files --data-dir {settings.data_dir}`"
    )
