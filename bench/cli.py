"""`python -m bench`: choose the parts and sizes, run them, print the tables."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import structlog
from rich.console import Console

from bench import disk, floor, least, objstore, outbox, packets, pipeline, rabbit
from bench.procs import machine
from bench.registry import REGISTRY, Options, RunContext, parts
from bench.report import MAIN_SECTION, markdown, print_tables, write_doc
from bench.units import GiB, KiB, MiB, parse_size, parse_sizes, size_name
from datahaul.cli.common import setup_logging
from datahaul.errors import ConfigError, DatahaulError

log = structlog.get_logger("datahaul.bench")

# The modules above register their parts when imported; naming them here
# keeps the imports from looking unused and fixes the order parts run in.
PART_MODULES = (disk, rabbit, objstore, floor, least, pipeline, packets, outbox)
ROOT = Path(__file__).resolve().parent.parent
QUICK_FILE = 64 * MiB
FULL_FILE = 1 * GiB


def parser() -> argparse.ArgumentParser:
    described = "; ".join(f"{p.name}: {p.description}" for p in parts())
    cli = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure datahaul end to end beside a bare RabbitMQ client "
        "and the NATS object store, in one run.",
        epilog=f"Parts, in the order they run: {described}.",
    )
    cli.add_argument(
        "--parts",
        default=",".join(p.name for p in parts()),
        help="comma-separated parts to run (default: all)",
    )
    cli.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: a {size_name(QUICK_FILE)} file, 10,000 small messages",
    )
    cli.add_argument(
        "--size",
        type=parse_size,
        help=f"source file size (default {size_name(FULL_FILE)})",
    )
    cli.add_argument(
        "--chunk-sizes",
        type=parse_sizes,
        default=[256 * KiB, MiB],
        help="chunk sizes for the file, e.g. 256K,1M (default)",
    )
    cli.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    cli.add_argument(
        "--small-size",
        type=parse_size,
        default=KiB,
        help="size of the small messages (default 1K)",
    )
    cli.add_argument(
        "--small-count",
        type=int,
        help="number of small messages (default 100000, quick 10000)",
    )
    cli.add_argument(
        "--small-per-file",
        type=int,
        default=100,
        help="small packets per text file in the small part (default 100: "
        "100,000 packets in 1,000 files)",
    )
    cli.add_argument(
        "--publish-sizes",
        type=parse_sizes,
        help="message sizes for the publish-alone ceiling (default: the small "
        "size and the outbox chunk size)",
    )
    cli.add_argument(
        "--outbox-size",
        type=parse_size,
        help="bytes sent into the outbox (default: the source file's size, what "
        "the publish-alone ceiling publishes)",
    )
    cli.add_argument(
        "--outbox-chunk-size",
        type=parse_size,
        default=256 * KiB,
        help="packet size in the outbox part (default 256K)",
    )
    cli.add_argument(
        "--latency-count",
        type=int,
        help="one-packet files in the burst that finds the highest rate "
        "(default 2000, quick 500)",
    )
    cli.add_argument(
        "--latency-seconds",
        type=float,
        help="how long files are sent at the steady rate (default 20, quick 5)",
    )
    cli.add_argument(
        "--latency-rate",
        type=float,
        help="files per second for the latency (default: half the burst's rate)",
    )
    cli.add_argument(
        "--window",
        type=int,
        default=256,
        help="publisher confirms in flight (default 256)",
    )
    cli.add_argument("--prefetch", type=int, default=64)
    cli.add_argument(
        "--amqp-url",
        default="amqp://guest:guest@127.0.0.1:5672/",
        help="broker; each part runs in a fresh vhost of it",
    )
    cli.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    cli.add_argument("--nats-chunk", type=parse_size, default=128 * KiB)
    cli.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds one pipeline transfer may take (default 300)",
    )
    cli.add_argument(
        "--work-dir",
        type=Path,
        help="where the files go (default: a temporary directory)",
    )
    cli.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory (source file, service logs) and print it",
    )
    cli.add_argument(
        "--write-doc",
        nargs="?",
        const=ROOT / "docs" / "benchmarks.md",
        type=Path,
        metavar="PATH",
        help="write the tables into docs/benchmarks.md (or PATH)",
    )
    cli.add_argument(
        "--doc-section",
        default=MAIN_SECTION,
        metavar="NAME",
        help="which generated section --write-doc replaces (default "
        f"{MAIN_SECTION}); another name adds a section of its own, e.g. for a "
        "4 GiB memory run",
    )
    cli.add_argument(
        "--json", type=Path, metavar="PATH", help="also save the figures as JSON"
    )
    cli.add_argument("-v", "--verbose", action="store_true")
    return cli


def main() -> None:
    args = parser().parse_args()
    setup_logging(args.verbose)
    try:
        chosen = chosen_parts(args.parts)
        check_numbers(args)
        check_section(args.doc_section)
    except DatahaulError as exc:
        sys.exit(f"error: {exc}")

    work_dir = Path(tempfile.mkdtemp(prefix="datahaul-bench-", dir=args.work_dir))
    context = RunContext(options_from(args, work_dir))
    try:
        failures = asyncio.run(run_parts(context, chosen))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("interrupted: the parts' vhosts and services were removed")
    finally:
        if args.keep:
            print(f"work directory kept: {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    console = Console()
    print_tables(context.figures, console)
    for name, error in failures.items():
        console.print(f"[red]part {name} failed:[/red] {error}")
    save(args, context, failures)
    if failures:
        sys.exit(1)


def chosen_parts(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in REGISTRY]
    if unknown or not names:
        raise DatahaulError(
            f"unknown part(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(p.name for p in parts())}"
        )
    return names


def check_section(name: str) -> None:
    """A section name goes into HTML comments: letters, digits and '-' only."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ConfigError(
            f"--doc-section {name!r} may hold only lower-case letters, digits "
            "and '-', e.g. memory-4g"
        )


def check_numbers(args: argparse.Namespace) -> None:
    """Counts, durations and rates must be positive, or the parts make no sense."""
    for name in (
        "small_count",
        "small_per_file",
        "latency_count",
        "latency_seconds",
        "latency_rate",
    ):
        value = getattr(args, name)
        if value is not None and value <= 0:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be more than zero, got {value}")


def options_from(args: argparse.Namespace, work_dir: Path) -> Options:
    file_size = args.size or (QUICK_FILE if args.quick else FULL_FILE)
    small_count = args.small_count or (10_000 if args.quick else 100_000)
    # The bytes bare-publish sends: a drain of a quarter of them lasted about a
    # second, and one pause of the broker swung its ratio from 1.4 to 0.5.
    outbox_size = args.outbox_size or file_size
    publish_sizes = args.publish_sizes or sorted(
        {args.small_size, args.outbox_chunk_size}
    )
    return Options(
        file_size=file_size,
        chunk_sizes=args.chunk_sizes,
        queue_type=args.queue_type,
        small_size=args.small_size,
        small_count=small_count,
        publish_sizes=publish_sizes,
        window=args.window,
        prefetch=args.prefetch,
        amqp_url=args.amqp_url,
        nats_url=args.nats_url,
        nats_chunk=args.nats_chunk,
        work_dir=work_dir,
        timeout=args.timeout,
        small_per_file=args.small_per_file,
        outbox_size=outbox_size,
        outbox_chunk=args.outbox_chunk_size,
        latency_count=args.latency_count or (500 if args.quick else 2000),
        latency_seconds=args.latency_seconds or (5.0 if args.quick else 20.0),
        latency_rate=args.latency_rate,
    )


async def run_parts(context: RunContext, names: list[str]) -> dict[str, str]:
    """Run each part in turn; one failing does not stop the others."""
    stop_on_sigterm()
    failures = {}
    for name in names:
        started = time.perf_counter()
        context.loads[name] = os.getloadavg()[0]
        log.info("bench.part_started", part=name, load=context.loads[name])
        try:
            context.figures += await REGISTRY[name].run(context)
        except DatahaulError as exc:
            failures[name] = str(exc)
            log.error("bench.part_failed", part=name, error=str(exc))
            continue
        except Exception as exc:
            # A broker restarted by someone else mid-run, for instance: the
            # part's figures are void, the other parts may still stand.
            failures[name] = f"{type(exc).__name__}: {exc}"
            log.exception("bench.part_crashed", part=name)
            continue
        log.info(
            "bench.part_done",
            part=name,
            seconds=round(time.perf_counter() - started, 1),
        )
    return failures


def stop_on_sigterm() -> None:
    """SIGTERM cancels the run like Ctrl-C, so vhosts and services are removed."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def header(context: RunContext) -> list[str]:
    """Command, date, machine and servers: what the reader needs to compare."""
    options = context.options
    host = machine()
    command = "uv run python -m bench " + shlex.join(sys.argv[1:])
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    servers = [f"RabbitMQ {rabbitmq_version()}"]
    servers += [f"{k} {v}" for k, v in sorted(context.facts.items())]
    return [
        f"- Command: `{command.strip()}`",
        f"- Date: {now}",
        f"- Machine: {host['cores']} cores ({host['cpu']}), {host['memory']} memory, "
        f"Linux {host['kernel']}, Python {host['python']}",
        f"- Servers: {', '.join(servers)}",
        f"- Source file: {size_name(options.file_size)} of random bytes; "
        f"{options.queue_type} queues; {options.window} confirms in flight; "
        f"prefetch {options.prefetch}; MB = 10^6 bytes",
        "- Load average (1 min) as each part started, other work included: "
        + ", ".join(f"{name} {load:.1f}" for name, load in context.loads.items()),
    ]


def rabbitmq_version() -> str:
    try:
        done = subprocess.run(
            ["rabbitmqctl", "version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "(version unknown)"
    return done.stdout.strip()


def save(
    args: argparse.Namespace, context: RunContext, failures: dict[str, str]
) -> None:
    lines = header(context)
    if args.write_doc:
        section = markdown(context.figures, lines, failures, args.doc_section)
        write_doc(args.write_doc, section)
    if args.json:
        record = {
            "header": lines,
            "figures": [asdict(figure) for figure in context.figures],
            "failures": failures,
        }
        args.json.write_text(json.dumps(record, indent=2))
