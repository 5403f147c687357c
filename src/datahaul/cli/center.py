"""`datahaul center`: the file API, the live dashboard and /metrics."""

from __future__ import annotations

from pathlib import Path

import typer

from datahaul.cli.common import ExitCode, fail
from datahaul.cli.services import AMQP_URL, CATALOG_URL, DATA_DIR, joined_urls
from datahaul.config import Settings
from datahaul.errors import DatahaulError

BLOB_URL = typer.Option(
    None,
    "--blob-url",
    help="Where images and video are stored: file:///PATH or s3://BUCKET/PREFIX?... "
    "(env DATAHAUL_BLOB_URL; default DATA_DIR/blobs)",
)


def register(app: typer.Typer) -> None:
    app.command()(center)


def center(
    port: int = typer.Option(
        8090, "--port", envvar="DATAHAUL_CENTER_PORT", help="Port (default 8090)"
    ),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        envvar="DATAHAUL_CENTER_HOST",
        help="Address (default 127.0.0.1)",
    ),
    amqp_url: list[str] | None = AMQP_URL,
    data_dir: Path | None = DATA_DIR,
    catalog_url: str | None = CATALOG_URL,
    blob_url: str | None = BLOB_URL,
) -> None:
    """Serve the center: find and download files, watch the pipeline live."""
    from datahaul.center.app import run

    try:
        settings = Settings.load(
            amqp_url=joined_urls(amqp_url),
            data_dir=data_dir,
            catalog_url=catalog_url,
            blob_url=blob_url,
        )
    except DatahaulError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    try:
        run(settings, host, port)
    except DatahaulError as exc:
        raise fail(str(exc), ExitCode.UNAVAILABLE) from None
    except OSError as exc:
        raise fail(
            f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another "
            "--port",
            ExitCode.UNAVAILABLE,
        ) from None
