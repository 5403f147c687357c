"""The real sender, driven in its own process, reporting when each answer came.

The harness runs `python -m bench.drive MODE LIST ...` so that the sender has
a process (and a CPU) of its own, as on a robot, and so that neither the
clocks nor the CPU meters count the interpreter's start-up. Two modes:

- `burst`: `Sender.send_files` on every listed file at once, as
  `datahaul send FILES...` does;
- `paced`: one `Sender.send_file` started every 1/RATE seconds.

The child and the harness talk in lines: the child prints `ready` once its
modules are loaded and waits for a line on stdin; then it sends, prints one
JSON object, and waits for stdin to close before it exits, so that its CPU
time can still be read. Instants are `time.perf_counter()` readings: on
Linux that is CLOCK_MONOTONIC, one clock for every process on the machine,
so the harness can set them against its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.procs import collector_paused
from bench.registry import BenchmarkError
from datahaul.cli.common import setup_logging
from datahaul.errors import DatahaulError
from datahaul.sender import ProgressEvent, Sender, SendResult

IMPORTED = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Answers:
    """When the gateway answered each file's packets, from the progress hook."""

    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    answers: int = 0

    def hear(self, event: ProgressEvent) -> None:
        # The hook hears "sending" when a 2xx came back for some of a file's
        # packets (one request may carry several of them).
        if event.phase != "sending" or event.advance <= 0:
            return
        now = time.perf_counter()
        self.first.setdefault(event.source, now)
        self.last[event.source] = now
        self.answers += 1


async def burst(
    gateway: str, paths: Sequence[str], data_type: str, chunk: str
) -> dict[str, Any]:
    answers = Answers()
    async with Sender(gateway, progress=answers.hear) as sender:
        started = time.perf_counter()
        outcomes = await sender.send_files(paths, type=data_type, chunk_size=chunk)
        finished = time.perf_counter()
    return report(started, finished, outcomes, answers)


async def paced(
    gateway: str, paths: Sequence[str], data_type: str, chunk: str, rate: float
) -> dict[str, Any]:
    answers = Answers()
    async with Sender(gateway, progress=answers.hear) as sender:
        started = time.perf_counter()
        late = 0.0
        tasks = []
        for index, path in enumerate(paths):
            due = started + index / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                late = max(late, -wait)
            send = sender.send_file(path, type=data_type, chunk_size=chunk)
            tasks.append(asyncio.create_task(send))
        outcomes = list(await asyncio.gather(*tasks, return_exceptions=True))
        finished = time.perf_counter()
    result = report(started, finished, outcomes, answers)
    result["late_seconds"] = late
    return result


def report(
    started: float,
    finished: float,
    outcomes: Sequence[SendResult | BaseException],
    answers: Answers,
) -> dict[str, Any]:
    """What the harness needs: the instants, each file's id and answer, errors."""
    files = []
    failures = []
    for outcome in outcomes:
        if isinstance(outcome, SendResult):
            files.append(
                {
                    "file_id": outcome.file_id,
                    "packets_sent": outcome.packets_sent,
                    "packets_buffered": outcome.packets_buffered,
                    "answered": answers.last.get(outcome.source),
                }
            )
        else:
            failures.append(f"{type(outcome).__name__}: {outcome}")
    return {
        "imported": IMPORTED,
        "started": started,
        "finished": finished,
        "first_answer": min(answers.first.values(), default=None),
        "last_answer": max(answers.last.values(), default=None),
        "answers": answers.answers,
        "files": files,
        "failures": failures,
    }


# --- the harness's side ---------------------------------------------------------

STOP_SECONDS = 10.0
# The report is one line naming every file: 10,000 files make about 1.5 MB.
REPORT_LIMIT = 256 * 1024 * 1024


@dataclass(frozen=True)
class DriveRun:
    """What one driven send reported, and when the harness launched it."""

    launched: float
    record: dict[str, Any]

    @property
    def started(self) -> float:
        return float(self.record["started"])

    @property
    def finished(self) -> float:
        return float(self.record["finished"])

    @property
    def startup(self) -> float:
        """Seconds from launching the process to the sender's modules loaded."""
        return float(self.record["imported"]) - self.launched

    @property
    def files(self) -> list[dict[str, Any]]:
        return list(self.record["files"])

    def packets(self, kind: str = "packets_sent") -> int:
        return sum(int(item[kind]) for item in self.files)

    def answer_window(self) -> tuple[float, float]:
        """First and last 2xx, the span in which the gateway took the packets."""
        first, last = self.record["first_answer"], self.record["last_answer"]
        if first is None or last is None:
            raise BenchmarkError("the sender reported no answer from the gateway")
        return float(first), float(last)


@dataclass
class Driver:
    """A sender process that has loaded its modules and waits for `go`."""

    mode: str
    files: int
    child: asyncio.subprocess.Process
    launched: float
    log_path: Path
    timeout: float

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.child.pid)

    async def go(self) -> None:
        assert self.child.stdin is not None
        self.child.stdin.write(b"go\n")
        await self.child.stdin.drain()

    async def result(self) -> DriveRun:
        """The child's report; an error if it failed or any file did."""
        line = await self._line("its report")
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BenchmarkError(
                f"the sender ({self.mode}) printed {line[:300]!r}, not JSON"
            ) from None
        if record["failures"]:
            raise BenchmarkError(
                f"{len(record['failures'])} of {self.files} files failed to send; "
                f"the first: {record['failures'][0]}"
            )
        return DriveRun(self.launched, record)

    async def _line(self, what: str) -> str:
        assert self.child.stdout is not None
        try:
            line = await asyncio.wait_for(self.child.stdout.readline(), self.timeout)
        except TimeoutError:
            raise BenchmarkError(
                f"the sender ({self.mode}) gave no {what} within {self.timeout:g} s"
            ) from None
        if not line:
            code = await self.child.wait()
            raise BenchmarkError(
                f"the sender ({self.mode}) exited with code {code} before {what}: "
                f"{self.tail()}"
            )
        return line.decode(errors="replace").strip()

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return "(no log)"

    async def close(self) -> None:
        """Let the child exit (stdin closed); kill it if it does not."""
        if self.child.stdin is not None and not self.child.stdin.is_closing():
            self.child.stdin.close()
        try:
            await asyncio.wait_for(self.child.wait(), STOP_SECONDS)
        except TimeoutError:
            self.child.kill()
            await self.child.wait()


@contextlib.asynccontextmanager
async def driver(
    mode: str,
    paths: Sequence[Path],
    *,
    gateway_url: str,
    data_type: str,
    chunk: str,
    work_dir: Path,
    timeout: float,
    rate: float | None = None,
) -> AsyncIterator[Driver]:
    """Start a sender process and wait until it is ready to send."""
    stem = work_dir / f"drive-{mode}-{secrets.token_hex(3)}"
    listing = stem.with_suffix(".txt")
    listing.write_text("".join(f"{path}\n" for path in paths))
    command = [
        sys.executable, "-m", "bench.drive", mode, str(listing),
        "--gateway", gateway_url, "--type", data_type, "--chunk-size", chunk,
    ]  # fmt: skip
    if rate is not None:
        command += ["--rate", f"{rate:.3f}"]
    log_path = stem.with_suffix(".log")
    launched = time.perf_counter()
    with log_path.open("wb") as log_file:
        child = await asyncio.create_subprocess_exec(
            *command,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            limit=REPORT_LIMIT,
        )
    started = Driver(mode, len(paths), child, launched, log_path, timeout)
    try:
        ready = await started._line("its ready line")
        if ready != "ready":
            raise BenchmarkError(f"the sender ({mode}) said {ready!r}, not ready")
        yield started
    finally:
        await started.close()
        listing.unlink(missing_ok=True)


async def drive(mode: str, paths: Sequence[Path], **options: Any) -> DriveRun:
    """Start a sender, let it send at once, and return its report."""
    async with driver(mode, paths, **options) as sender:
        await sender.go()
        return await sender.result()


# --- the child's command line -------------------------------------------------


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="python -m bench.drive")
    cli.add_argument("mode", choices=["burst", "paced"])
    cli.add_argument("list", type=Path, help="a file naming one path per line")
    cli.add_argument("--gateway", required=True)
    cli.add_argument("--type", required=True, choices=["text", "image", "video"])
    cli.add_argument("--chunk-size", required=True)
    cli.add_argument("--rate", type=float, help="files per second (paced)")
    return cli


async def run(args: argparse.Namespace, paths: list[str]) -> dict[str, Any]:
    if args.mode == "burst":
        return await burst(args.gateway, paths, args.type, args.chunk_size)
    return await paced(args.gateway, paths, args.type, args.chunk_size, args.rate)


def main() -> None:
    args = parser().parse_args()
    # As `datahaul send` does: INFO and above, on stderr; stdout is the report.
    setup_logging(verbose=False)
    paths = [path for path in args.list.read_text().split("\n") if path]
    if args.mode == "paced" and not (args.rate and args.rate > 0):
        sys.exit("error: paced mode needs --rate, a number of files per second > 0")

    print("ready", flush=True)
    if not sys.stdin.readline():
        return
    try:
        with collector_paused():
            result = asyncio.run(run(args, paths))
    except DatahaulError as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result), flush=True)
    # Stay until the harness has read this process's CPU time.
    sys.stdin.read()


if __name__ == "__main__":
    main()
