"""What every subcommand shares: exit codes, logging and settings flags."""

from __future__ import annotations

import enum
import logging
import sys

import structlog
import typer


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    UNAVAILABLE = 4
    MISMATCH = 5


def global_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug events."),
) -> None:
    """Move large files from robots and vehicles to a center system."""
    setup_logging(verbose)


def setup_logging(verbose: bool) -> None:
    """Key=value events on stderr; INFO by default, DEBUG with --verbose."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    # The AMQP client logs every failed reconnect at ERROR; datahaul reports
    # the link's state as its own events instead.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def fail(message: str, code: ExitCode = ExitCode.FAILURE) -> typer.Exit:
    """Print an error for a person and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))
