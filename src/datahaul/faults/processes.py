"""datahaul processes that a test or the soak command starts, kills and restarts.

    gateway = ServiceProcess.gateway(port, env, log_dir).start().wait_ready()
    worker = ServiceProcess.worker("all", env, log_dir).start().wait_ready()
    worker.kill9()
    worker.restart()

Each process runs `python -m datahaul ...` with the current interpreter in a
session of its own (so kill9 takes any children with it), with only the
DATAHAUL_* variables it is given, and writes its output to <log_dir>/<name>.log,
appending across restarts so that one file tells a process's whole story.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from datahaul.broker.topology import QUEUES
from datahaul.config import ENV_PREFIX, Settings
from datahaul.faults import HarnessError
from datahaul.faults.rabbit import wait_for_consumers

log = structlog.get_logger("datahaul.faults")

T = TypeVar("T")

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
WORKER_TYPES = (*QUEUES, "all")

_live: weakref.WeakSet[ServiceProcess] = weakref.WeakSet()


class Readiness(Protocol):
    """How to tell that a started process is ready for work."""

    def wait(self, process: ServiceProcess, timeout: float) -> None: ...


class ServiceProcess:
    """One datahaul command run as a child process that can be killed and restarted."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str],
        log_dir: Path,
        readiness: Readiness | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = dict(env)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.readiness = readiness
        self.queues: list[str] = []
        self.url: str | None = None
        self.starts = 0
        self._popen: subprocess.Popen[bytes] | None = None

    @classmethod
    def gateway(
        cls,
        port: int,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        name: str = "gateway",
        extra_args: Sequence[str] = (),
        healthy_only: bool = True,
    ) -> ServiceProcess:
        """`datahaul gateway --port PORT`, ready once /healthz answers.

        With healthy_only (the default) ready means 200; without it, any HTTP
        answer will do, for a gateway started while the broker is down.
        """
        readiness = HttpHealth(f"http://127.0.0.1:{port}/healthz", healthy_only)
        args = ["gateway", "--port", str(port), *extra_args]
        process = cls(name, args, env, log_dir, readiness)
        process.url = f"http://127.0.0.1:{port}"
        return process

    @classmethod
    def worker(
        cls,
        kind: str,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        consumers_expected: Callable[[str], int] = lambda queue: 1,
    ) -> ServiceProcess:
        """`datahaul worker --type KIND`, ready once its queues have consumers.

        consumers_expected(queue) says how many consumers the queue must
        show, so that a second worker on a queue is not taken as ready
        because of the first one.
        """
        queues = worker_queues(kind)
        urls = env.get(ENV_PREFIX + "AMQP_URL") or Settings.amqp_url
        amqp_url = urls.split(",")[0].strip()
        readiness = QueueConsumers(amqp_url, queues, consumers_expected)
        args = ["worker", "--type", kind, *extra_args]
        process = cls(name or f"worker-{kind}", args, env, log_dir, readiness)
        process.queues = queues
        return process

    def __repr__(self) -> str:
        if self._popen is None:
            state = "not started"
        else:
            state = "running" if self.is_running else f"exited {self.returncode}"
        return f"<ServiceProcess {self.name} pid={self.pid} {state}>"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    @property
    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "datahaul", *self.args]

    def start(self) -> ServiceProcess:
        """Start the process (not waiting for it to be ready); returns self."""
        if self.is_running:
            raise HarnessError(f"{self.name} is already running as pid {self.pid}")

        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            banner = f"=== start {self.starts}: {' '.join(self.command)}\n"
            log_file.write(banner.encode())
            log_file.flush()
            self._popen = subprocess.Popen(
                self.command,
                env=child_environment(self.env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _live.add(self)
        log.info("process.started", name=self.name, pid=self.pid, start=self.starts)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> ServiceProcess:
        """Block until the process serves; raise with its log's tail if it dies."""
        if self._popen is None:
            raise HarnessError(f"{self.name} was never started; call start() first")
        if self.readiness is not None:
            self.readiness.wait(self, timeout)
        elif not self.is_running:
            raise self.exited_error("right after it started")
        return self

    async def wait_ready_async(self, within: float = READY_TIMEOUT) -> ServiceProcess:
        """wait_ready without blocking the caller's event loop."""
        return await asyncio.to_thread(self.wait_ready, within)

    def kill9(self) -> int:
        """SIGKILL the process and its children; return once it is reaped."""
        return self._signal_and_reap(signal.SIGKILL, STOP_TIMEOUT)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, and SIGKILL if it has not exited within timeout."""
        try:
            return self._signal_and_reap(signal.SIGTERM, timeout)
        except subprocess.TimeoutExpired:
            log.warning("process.term_ignored", name=self.name, seconds=timeout)
            return self.kill9()

    def restart(self, *, wait: bool = True, timeout: float = READY_TIMEOUT) -> None:
        """Terminate the process if it runs, start it again, wait till ready."""
        if self.is_running:
            self.terminate()
        self.start()
        if wait:
            self.wait_ready(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    def exited_error(self, when: str) -> HarnessError:
        return HarnessError(
            f"{self.name} (pid {self.pid}) exited with code {self.returncode} "
            f"{when}; last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def _signal_and_reap(self, signum: signal.Signals, timeout: float) -> int:
        popen = self._popen
        if popen is None:
            raise HarnessError(f"{self.name} was never started")
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signum)
        code = popen.wait(timeout)
        _live.discard(self)
        log.info("process.stopped", name=self.name, signal=signum.name, code=code)
        return code


class HttpHealth:
    """Ready once GET url answers 200 (or any HTTP status, if not healthy_only)."""

    def __init__(self, url: str, healthy_only: bool = True) -> None:
        self.url = url
        self.healthy_only = healthy_only

    def wait(self, process: ServiceProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if not process.is_running:
                raise process.exited_error(f"before {self.url} answered")
            status = self._status()
            if status == 200 or (status is not None and not self.healthy_only):
                return
            last = f"HTTP {status}" if status is not None else "no answer"
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{process.name}: {self.url} gave {last} for {timeout:g}s; "
                    f"last lines of {process.log_path}:\n{process.log_tail()}"
                )
            time.sleep(0.05)

    def _status(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None


class QueueConsumers:
    """Ready once each queue shows at least expected(queue) consumers."""

    def __init__(
        self, amqp_url: str, queues: Sequence[str], expected: Callable[[str], int]
    ) -> None:
        self.amqp_url = amqp_url
        self.queues = list(queues)
        self.expected = expected

    def wait(self, process: ServiceProcess, timeout: float) -> None:
        try:
            run_coroutine(
                wait_for_consumers(
                    self.amqp_url,
                    self.queues,
                    self.expected,
                    within=timeout,
                    still_worth_waiting=lambda: process.is_running,
                )
            )
        except HarnessError as exc:
            if not process.is_running:
                raise process.exited_error("before it consumed") from None
            raise HarnessError(
                f"{process.name}: {exc}; last lines of {process.log_path}:\n"
                f"{process.log_tail()}"
            ) from None


def worker_queues(kind: str) -> list[str]:
    """The queues a `datahaul worker --type KIND` consumes from."""
    if kind not in WORKER_TYPES:
        raise HarnessError(
            f"worker type {kind!r} is unknown; use one of {', '.join(WORKER_TYPES)}"
        )
    return list(QUEUES.values()) if kind == "all" else [QUEUES[kind]]


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from sync code, even inside a running loop."""
    # A thread of its own gets a loop of its own, whatever the caller runs.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its DATAHAUL_* settings, plus env."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return {**inherited, "PYTHONUNBUFFERED": "1", **env}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def kill_all() -> None:
    """SIGKILL every process this module started that still runs."""
    for process in list(_live):
        if process.is_running:
            process.kill9()


atexit.register(kill_all)
