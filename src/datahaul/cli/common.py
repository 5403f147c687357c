"""What every subcommand shares: exit codes, logging and settings flags."""

from __future__ import annotations

import ctypes
import enum
import gc
import logging
import platform
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


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGE_BUFFER_BYTES = 4 * 1024 * 1024
KEPT_FREE_BYTES = 16 * 1024 * 1024


def keep_large_buffers() -> None:
    """Let glibc reuse the memory of freed message buffers instead of
    handing it back and faulting it in again for the next message.

    By default a buffer past 128 KiB (a chunk, a bundle) is mapped afresh,
    or the heap is trimmed as soon as 2 buffers' worth is free: a page
    fault for every 4 KiB of payload, 284,000 per GiB in the worker. The
    gateway, the worker and `datahaul send` call this as they start.
    Elsewhere than glibc this does nothing.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)


def freeze_startup_heap() -> None:
    """Keep what a service loads at start-up out of the collector's full passes.

    Measured with `gc.callbacks` during the latency benchmark, a full
    collection took 40-60 ms in the worker and 41 ms in the gateway, and no
    packet moves meanwhile; in `datahaul send` collections took 7% of the
    CPU of a 1 GiB send. Modules and settings live as long as the process,
    so scanning them again and again finds nothing.
    """
    gc.collect()
    gc.freeze()
