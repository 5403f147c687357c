"""Looking at results: `datahaul files` and `datahaul status FILE_ID`."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from datahaul.cli.common import ExitCode, fail
from datahaul.cli.services import CATALOG_URL, DATA_DIR
from datahaul.config import Settings
from datahaul.errors import DatahaulError
from datahaul.storage.catalog import RECEIVING, Catalog, FileRecord, missing_ranges
from datahaul.storage.sql import sqlite_path

JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


def register(app: typer.Typer) -> None:
    app.command("files")(list_files)
    app.command()(status)


def list_files(
    type: str | None = typer.Option(None, "--type", help="Only this data type."),
    state: str | None = typer.Option(None, "--state", help="Only files in this state."),
    device: str | None = typer.Option(None, "--device", help="Only this device id."),
    limit: int = typer.Option(50, "--limit", help="At most this many files."),
    as_json: bool = JSON,
    data_dir: Path | None = DATA_DIR,
    catalog_url: str | None = CATALOG_URL,
) -> None:
    """List the files in the center catalog, newest first."""
    catalog = _open(data_dir, catalog_url)
    records = catalog.list_files(type=type, state=state, device_id=device, limit=limit)
    if as_json:
        typer.echo(msgspec.json.encode([r.to_json() for r in records]).decode())
        return

    table = Table(
        "file id", "type", "state", "packets", "size", "sha256", "name", "created"
    )
    for r in records:
        table.add_row(
            r.file_id,
            r.type,
            r.state,
            f"{r.received}/{r.total_seq}" if r.state == RECEIVING else str(r.total_seq),
            _size(r.size if r.size is not None else r.received_bytes),
            (r.sha256 or "")[:16],
            r.file_name or "",
            _when(r.created_at),
        )
    Console().print(table)


def status(
    file_id: str = typer.Argument(
        ..., help="The file's id, as `datahaul send` printed."
    ),
    as_json: bool = JSON,
    data_dir: Path | None = DATA_DIR,
    catalog_url: str | None = CATALOG_URL,
) -> None:
    """Show one file: state, packets received of total, size, SHA-256, location."""
    catalog = _open(data_dir, catalog_url)
    record = catalog.get(file_id)
    if record is None:
        raise fail(
            f"no file {file_id!r} in the catalog at {catalog.db.url}; "
            "packets may still be on their way",
            ExitCode.NOT_FOUND,
        )
    details = describe(catalog, record)
    if as_json:
        typer.echo(msgspec.json.encode(details).decode())
        return

    table = Table(show_header=False, box=None)
    for key, value in details.items():
        if key == "missing":
            value = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in value) or "-"
        table.add_row(key, "" if value is None else str(value))
    Console().print(table)


def describe(catalog: Catalog, record: FileRecord) -> dict[str, Any]:
    """A file's catalog row, plus the seq ranges still missing if incomplete."""
    details = record.to_json()
    details["missing"] = (
        missing_ranges(catalog.received_seqs(record.file_id), record.total_seq)
        if record.state == RECEIVING
        else []
    )
    return details


def _open(data_dir: Path | None, catalog_url: str | None) -> Catalog:
    """The catalog to read; an embedded one must already exist (a typo in
    --data-dir should not quietly create an empty catalog)."""
    try:
        url = Settings.load(data_dir=data_dir, catalog_url=catalog_url).catalog_url
        embedded = sqlite_path(url)
        if embedded is not None and not embedded.exists():
            raise fail(
                f"no catalog at {embedded}; pass the --data-dir (or "
                "DATAHAUL_CATALOG_URL) the workers use",
                ExitCode.NOT_FOUND,
            )
        return Catalog.open(url)
    except DatahaulError as exc:
        raise fail(str(exc), ExitCode.UNAVAILABLE) from None


def _size(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _when(stamp: float | None) -> str:
    if stamp is None:
        return ""
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")
