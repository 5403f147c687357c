"""`datahaul demo`: run the whole pipeline on generated files and show the result."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from datahaul.cli.common import ExitCode, fail
from datahaul.cli.services import AMQP_URL, DATA_DIR
from datahaul.config import Settings
from datahaul.demo import DemoRow, free_port, run_demo
from datahaul.errors import DatahaulError


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    port: int = typer.Option(8080, "--port", help="Gateway port (another if busy)."),
    center_port: int = typer.Option(
        8090, "--center-port", help="Center and dashboard port (another if busy)."
    ),
    workers: int = typer.Option(2, "--workers", help="Worker processes to start."),
    stay: bool = typer.Option(
        False, "--stay", help="Keep everything running afterwards, until Ctrl-C."
    ),
    amqp_url: str | None = AMQP_URL,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Start a gateway, workers and the center; send sample files; show where
    they landed."""
    console = Console(width=max(Console().width, 160))
    settings = Settings.load(amqp_url=amqp_url, data_dir=data_dir)
    port, center_port = free_port(port), free_port(center_port)
    console.print(f"datahaul demo: dashboard on http://127.0.0.1:{center_port}/")
    console.print(
        f"gateway on http://127.0.0.1:{port}, {workers} workers, "
        f"data in {settings.data_dir}"
    )

    async def show_and_stay(rows: list[DemoRow]) -> None:
        _report(console, rows)
        console.print("everything keeps running; Ctrl-C stops it")
        await asyncio.Event().wait()

    try:
        rows = asyncio.run(
            run_demo(
                settings, port, workers, center_port, show_and_stay if stay else None
            )
        )
    except KeyboardInterrupt:
        raise typer.Exit(0 if stay else 130) from None
    except DatahaulError as exc:
        raise fail(
            f"{exc}. Is RabbitMQ running? (rabbitmq-server -detached)",
            ExitCode.UNAVAILABLE,
        ) from None
    if stay:
        return

    _report(console, rows)
    if not all(row.verified for row in rows):
        raise fail(
            "some files were not stored intact; see the table above",
            ExitCode.MISMATCH,
        )
    console.print(
        f"all {len(rows)} files stored and verified; "
        f"try `datahaul files --data-dir {settings.data_dir}`, or "
        "`datahaul demo --stay` to keep the dashboard up"
    )


def _report(console: Console, rows: list[DemoRow]) -> None:
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
