"""`datahaul send`: move files from this machine to a gateway, with progress."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import structlog
import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from datahaul.cli import early_hash
from datahaul.cli.common import (
    ExitCode,
    fail,
    freeze_startup_heap,
    keep_large_buffers,
)
from datahaul.config import Settings
from datahaul.errors import DatahaulError
from datahaul.sender import (
    DEFAULT_CONCURRENCY,
    GatewayUnavailable,
    ProgressEvent,
    RetryPolicy,
    Sender,
    SendResult,
)
from datahaul.sender.chunking import (
    check_file_id,
    check_type,
    infer_type,
    parse_size,
)

# Past this many files one bar each would fill the screen; the total suffices.
MAX_FILE_BARS = 12
FILE_ID_WIDTH = 32
PIPED_WIDTH = 160

Outcome = SendResult | DatahaulError


def register(app: typer.Typer) -> None:
    app.command()(send)


PATHS = typer.Argument(..., help="Files to send.", show_default=False)


def send(
    paths: list[Path] = PATHS,
    type: str | None = typer.Option(
        None, "--type", help="text, image or video (default: from each file's name)"
    ),
    chunk_size: str = typer.Option(
        "256K", "--chunk-size", help="Bytes per packet: 262144, 256K, 1M (max 16M)."
    ),
    gateway: str | None = typer.Option(
        None,
        "--gateway",
        help="Gateway URL (env DATAHAUL_GATEWAY_URL; default http://127.0.0.1:8080)",
    ),
    file_id: str | None = typer.Option(
        None,
        "--file-id",
        help="Id for the file, one PATH only (default: from its content)",
    ),
    device_id: str | None = typer.Option(
        None, "--device-id", help="Robot or vehicle the files come from."
    ),
    metadata: str | None = typer.Option(
        None, "--metadata", help="A JSON object stored with each file: '{\"run\": 7}'"
    ),
    concurrency: int = typer.Option(
        DEFAULT_CONCURRENCY, "--concurrency", help="Requests in flight at once."
    ),
    attempts: int = typer.Option(
        RetryPolicy().attempts,
        "--attempts",
        help="Tries per request on connection errors and 5xx before giving up.",
    ),
    sha256: bool = typer.Option(
        False,
        "--sha256",
        help="Also work out each file's SHA-256 here and send it, for the worker "
        "to check beside the XXH128 (more CPU on this machine).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="Draw no progress bars."
    ),
) -> None:
    """Send files to the gateway, resuming what it already has; prints each id."""
    keep_large_buffers()
    try:
        files = _check_paths(paths, type)
        options = _send_options(type, chunk_size, file_id, device_id, metadata, files)
        gateway_url = Settings.load(gateway_url=gateway).gateway_url
        retry = RetryPolicy(attempts=attempts)
        sender = Sender(
            gateway_url,
            concurrency=concurrency,
            retry=retry,
            known_digests=early_hash.digests_for,
            sha256=sha256,
        )
    except DatahaulError as error:
        raise fail(str(error), ExitCode.USAGE) from None

    stdout = Console()
    if not stdout.is_terminal:
        # Piped into a file or a log, rows should not fold at 80 columns.
        stdout = Console(width=PIPED_WIDTH)
    errors = Console(stderr=True)
    show_bars = errors.is_terminal and not no_progress
    freeze_startup_heap()
    outcomes = asyncio.run(_send_all(sender, files, options, errors, show_bars))

    if as_json:
        typer.echo(
            json.dumps([_as_json(p, o) for p, o in zip(files, outcomes, strict=True)])
        )
    else:
        stdout.print(_table(files, outcomes))
    _report_failures(files, outcomes)
    raise typer.Exit(int(_exit_code(outcomes)))


def _check_paths(paths: Sequence[Path], type: str | None) -> list[Path]:
    """Every PATH is a readable file whose type is known, or nothing is sent."""
    unique = list(dict.fromkeys(paths))
    problems: list[str] = []
    for path in unique:
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            problems.append(f"{path} {what}; name the files to send")
        elif type is None:
            try:
                infer_type(path.name)
            except DatahaulError as error:
                problems.append(str(error))
    if problems:
        raise DatahaulError("\n".join(problems))
    return unique


def _send_options(
    type: str | None,
    chunk_size: str,
    file_id: str | None,
    device_id: str | None,
    metadata: str | None,
    files: Sequence[Path],
) -> dict[str, Any]:
    if file_id is not None and len(files) > 1:
        raise DatahaulError(
            f"--file-id names one file but {len(files)} were given; "
            "send them one at a time or let each get its own id"
        )
    return {
        "type": check_type(type) if type else None,
        "chunk_size": parse_size(chunk_size),
        "file_id": check_file_id(file_id) if file_id else None,
        "device_id": device_id,
        "metadata": _parse_metadata(metadata),
    }


def _parse_metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise DatahaulError(f"--metadata is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise DatahaulError(f"--metadata must be a JSON object, got {text}")
    return value


async def _send_all(
    sender: Sender,
    files: list[Path],
    options: dict[str, Any],
    console: Console,
    show_bars: bool,
) -> list[Outcome]:
    bars = _Bars(files, console, enabled=show_bars)
    sender.progress = bars.on_event
    with bars.progress:
        if show_bars:
            _log_above(console)
        async with sender:
            if options["file_id"] is not None:
                return [await _send_one(sender, files[0], options)]
            del options["file_id"]
            return await sender.send_files(files, **options)


async def _send_one(sender: Sender, path: Path, options: dict[str, Any]) -> Outcome:
    try:
        return await sender.send_file(path, **options)
    except DatahaulError as error:
        return error


def _log_above(console: Console) -> None:
    """Log lines go through the console, so they print above live bars."""
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(
            file=cast(TextIO, _ConsoleWriter(console))
        )
    )


class _ConsoleWriter:
    def __init__(self, console: Console) -> None:
        self._console = console
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._console.print(line, markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        return None


class _Bars:
    """Progress bars per file (for a few files) and for all the bytes."""

    def __init__(self, files: list[Path], console: Console, *, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self._sizes = {str(path): path.stat().st_size for path in files}
        self._count = len(files)
        self._finished = 0
        self._done: dict[str, int] = dict.fromkeys(self._sizes, 0)
        self._total = self.progress.add_task(
            self._total_label(), total=sum(self._sizes.values())
        )
        self._per_file: dict[str, TaskID] = {}
        if len(files) <= MAX_FILE_BARS:
            for path in files:
                self._per_file[str(path)] = self.progress.add_task(
                    path.name, total=self._sizes[str(path)], start=False
                )

    def on_event(self, event: ProgressEvent) -> None:
        task = self._per_file.get(event.source)
        name = Path(event.source).name
        if event.phase == "hashing" and task is not None:
            self.progress.update(task, description=f"{name} (hashing)")
        elif event.phase == "sending":
            self._advance(event.source, event.advance, task, name)
        elif event.phase in ("done", "failed"):
            self._finish(event, task, name)

    def _advance(
        self, source: str, advance: int, task: TaskID | None, name: str
    ) -> None:
        self._done[source] = self._done.get(source, 0) + advance
        self.progress.advance(self._total, advance)
        if task is not None:
            self.progress.start_task(task)
            self.progress.update(task, description=name, advance=advance)

    def _finish(self, event: ProgressEvent, task: TaskID | None, name: str) -> None:
        self._finished += 1
        self.progress.update(self._total, description=self._total_label())
        if event.phase == "done":
            remaining = event.size - self._done.get(event.source, 0)
            self._advance(event.source, remaining, task, name)
        elif task is not None:
            self.progress.update(task, description=f"{name} (failed)")

    def _total_label(self) -> str:
        return f"total ({self._finished}/{self._count} files)"


def _table(files: list[Path], outcomes: list[Outcome]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # The id is what a person needs next (`datahaul status ID`): never cut it.
    table.add_column("path", overflow="fold")
    table.add_column("file_id", no_wrap=True, min_width=FILE_ID_WIDTH)
    table.add_column("type")
    for column in ("size", "sent", "skip"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for path, outcome in zip(files, outcomes, strict=True):
        if isinstance(outcome, SendResult):
            table.add_row(
                str(path),
                outcome.file_id,
                outcome.type,
                _human(outcome.size),
                str(outcome.packets_sent),
                str(outcome.packets_skipped),
                outcome.status,
            )
        else:
            table.add_row(str(path), "", "", "", "", "", "[red]failed[/red]")
    return table


def _as_json(path: Path, outcome: Outcome) -> dict[str, Any]:
    if isinstance(outcome, SendResult):
        fields = outcome.to_json()
        del fields["source"]
        return {"path": str(path), **fields}
    return {
        "path": str(path),
        "status": "failed",
        "error": type(outcome).__name__,
        "message": str(outcome),
    }


def _report_failures(files: list[Path], outcomes: list[Outcome]) -> None:
    for path, outcome in zip(files, outcomes, strict=True):
        if not isinstance(outcome, SendResult):
            typer.echo(f"error: {path}: {outcome}", err=True)


def _exit_code(outcomes: list[Outcome]) -> ExitCode:
    failures = [o for o in outcomes if not isinstance(o, SendResult)]
    if not failures:
        return ExitCode.OK
    if all(isinstance(o, GatewayUnavailable) for o in failures):
        return ExitCode.UNAVAILABLE
    return ExitCode.FAILURE


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    if unit == "B":
        return f"{size} B"
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
