"""`datahaul soak`: simulated robots and random faults, then a count of losses."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from datahaul.cli.common import ExitCode, fail


def register(app: typer.Typer) -> None:
    app.command()(soak)


def soak(
    duration: float = typer.Option(600.0, "--duration", help="Seconds of sending."),
    robots: int = typer.Option(6, "--robots", help="Simulated robots sending at once."),
    workers: int = typer.Option(2, "--workers", help="Worker processes."),
    fault_every: float = typer.Option(
        8.0, "--fault-every", help="Mean seconds between faults."
    ),
    broker_restarts: bool = typer.Option(
        True,
        "--broker-restarts/--no-broker-restarts",
        help="Also stop and start the machine's RabbitMQ (it is always restarted).",
    ),
    seed: int | None = typer.Option(None, "--seed", help="Repeat a run's choices."),
    keep: Path | None = typer.Option(
        None, "--keep", help="Work in this folder and keep it."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run many robots against a gateway and workers while faults strike; count
    the files sent, stored intact, lost, duplicated and corrupted."""
    from datahaul.faults.soak import SoakPlan
    from datahaul.faults.soak import soak as run_soak

    plan = SoakPlan(
        duration,
        robots=robots,
        workers=workers,
        fault_every=fault_every,
        broker_restarts=broker_restarts,
    )
    if seed is not None:
        plan.seed = seed
    report = asyncio.run(run_soak(plan, keep))

    if as_json:
        typer.echo(msgspec.json.encode(report.to_json()).decode())
    else:
        table = Table("measure", "value", title=f"soak, seed {plan.seed}")
        for key, value in report.to_json().items():
            table.add_row(key, str(value))
        Console().print(table)
    if not report.clean:
        raise fail("files were lost, duplicated or corrupted", ExitCode.MISMATCH)
