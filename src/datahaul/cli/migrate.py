"""`datahaul migrate`: bring the catalog's schema up to date, and say what changed.

Workers and the center migrate on start as well; this command is for a
deployment step that should fail loudly before any service starts, and for
seeing which schema version a database is at.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import typer

from datahaul.cli.common import ExitCode, fail
from datahaul.cli.services import CATALOG_URL, DATA_DIR
from datahaul.config import Settings
from datahaul.errors import ConfigError, DatahaulError
from datahaul.storage.catalog import MIGRATIONS, Catalog
from datahaul.storage.sql import DATABASE_FAILURES, open_database

FAILURES: tuple[type[Exception], ...] = (DatahaulError, *DATABASE_FAILURES)


def register(app: typer.Typer) -> None:
    app.command()(migrate)


def migrate(
    data_dir: Path | None = DATA_DIR,
    catalog_url: str | None = CATALOG_URL,
) -> None:
    """Apply the catalog's schema migrations that the database has not seen."""
    try:
        settings = Settings.load(data_dir=data_dir, catalog_url=catalog_url)
        catalog = Catalog(open_database(settings.catalog_url))
    except ConfigError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    where = without_password(settings.catalog_url)

    try:
        applied = catalog.migrate()
        version = schema_version(catalog)
    except FAILURES as exc:
        raise fail(
            f"could not migrate the catalog at {where}: {exc}", ExitCode.UNAVAILABLE
        ) from None
    finally:
        catalog.close()

    if version > latest_version():
        raise fail(
            f"the catalog at {where} is at schema version {version}, newer than "
            f"this datahaul's {latest_version()}; upgrade datahaul before using it",
            ExitCode.MISMATCH,
        )
    if applied:
        versions = ", ".join(str(v) for v in applied)
        typer.echo(f"applied migration(s) {versions} to {where}; now at {version}")
    else:
        typer.echo(f"schema of {where} is current at version {version}")


def schema_version(catalog: Catalog) -> int:
    """The newest migration the database has applied (0 for none)."""
    rows = catalog.db.query("SELECT MAX(version) FROM schema_migrations")
    version = rows[0][0] if rows else None
    return int(version) if version is not None else 0


def latest_version() -> int:
    """The newest migration this datahaul knows."""
    return max(version for version, _ in MIGRATIONS)


def without_password(url: str) -> str:
    """A database URL fit to print: the password, if any, masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
