"""Watching processes: peak memory, CPU time, and the machine they run on."""

from __future__ import annotations

import gc
import os
import platform
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.registry import Figure
from bench.units import MB, size_name


@contextmanager
def collector_paused() -> Iterator[None]:
    """Keep this process's cyclic garbage collector from pausing it meanwhile.

    For the harness and the sending driver, which take the timestamps: a
    full collection of the 40,000 events the harness had recorded in the
    latency part paused it for up to 107 ms (timed with `gc.callbacks`), and
    every file whose event arrived meanwhile was counted as stored that
    much later. Reference counting still frees what is dropped.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def members(process: psutil.Process) -> list[psutil.Process]:
    """The process and its children; empty once the process is gone."""
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_of(processes: list[psutil.Process]) -> int:
    """Resident bytes of these processes together, skipping any that ended."""
    total = 0
    for member in processes:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def tree_high_water(process: psutil.Process) -> int:
    """Sum of the kernel's per-process RSS peaks (VmHWM): an upper bound.

    The kernel keeps each process's peak exactly, so this catches spikes
    between two samples; summing peaks reached at different moments can
    only overstate the tree's true peak.
    """
    total = 0
    for member in members(process):
        try:
            status = Path(f"/proc/{member.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def tree_cpu_seconds(process: psutil.Process) -> float:
    """User plus system CPU seconds of a process and its live children."""
    total = 0.0
    for member in members(process):
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user
        total += times.children_system
    return total


@dataclass
class PeakSampler:
    """Samples the RSS of some process trees in a thread until stopped.

    Listing a tree's children scans every process on the machine, which at
    20 samples a second took a tenth of a core from the processes measured;
    so the trees are listed again only every `relist_every` seconds.
    """

    processes: dict[str, psutil.Process]
    interval: float = 0.05
    relist_every: float = 1.0
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _members: dict[str, list[psutil.Process]] = field(default_factory=dict)
    _listed_at: float = float("-inf")

    def start(self) -> None:
        self.peaks = dict.fromkeys(self.processes, 0)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return self.peaks

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = time.monotonic()
        if now - self._listed_at >= self.relist_every:
            self._members = {
                name: members(process) for name, process in self.processes.items()
            }
            self._listed_at = now
        for name, listed in self._members.items():
            self.peaks[name] = max(self.peaks[name], rss_of(listed))


@contextmanager
def sampled(processes: dict[str, psutil.Process]) -> Iterator[PeakSampler]:
    """Sample peak RSS while the block runs; read `.peaks` afterwards."""
    sampler = PeakSampler(processes)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


def tree_written(process: psutil.Process) -> int:
    """Bytes a process and its live children sent to the storage layer."""
    total = 0
    for member in members(process):
        try:
            total += member.io_counters().write_bytes
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
    return total


def device_of(path: Path) -> str | None:
    """The block device (as /proc/diskstats names it) holding `path`, if any."""
    try:
        number = os.stat(path).st_dev
        link = Path(f"/sys/dev/block/{os.major(number)}:{os.minor(number)}")
        return link.resolve(strict=True).name
    except OSError:
        return None


def device_written(device: str | None) -> int:
    """Bytes written to the device since boot, by every process on the machine."""
    if device is None:
        return 0
    counters = psutil.disk_io_counters(perdisk=True) or {}
    found = counters.get(device)
    return found.write_bytes if found is not None else 0


@dataclass
class CpuMeter:
    """CPU seconds and disk writes of named processes over an interval.

    `self_label` names this process (the benchmark's own client) and
    `children_label` the children that this process waits for during the
    interval (a sender run as a subprocess); either may be left out. When
    `device` is given, the bytes written to that block device by the whole
    machine are counted too.
    """

    processes: dict[str, psutil.Process]
    self_label: str | None = "client"
    children_label: str | None = None
    device: str | None = None
    used: dict[str, float] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    device_bytes: int = 0
    wall: float = 0.0

    @contextmanager
    def measure(self) -> Iterator[CpuMeter]:
        before = self._read()
        written_before = self._read_written()
        device_before = device_written(self.device)
        started = time.perf_counter()
        try:
            yield self
        finally:
            self.wall = time.perf_counter() - started
            after = self._read()
            self.used = {name: after[name] - before[name] for name in before}
            written_after = self._read_written()
            self.written = {
                name: written_after[name] - written_before[name]
                for name in written_before
            }
            self.device_bytes = device_written(self.device) - device_before

    def disk(self, payload: int) -> str:
        """'disk writes per payload byte: device 4.1 (352 MB/s), broker 2.0, ...'."""
        if payload <= 0 or self.wall <= 0:
            return ""
        parts = []
        if self.device is not None:
            rate = self.device_bytes / MB / self.wall
            parts.append(f"device {self.device_bytes / payload:.1f} ({rate:.0f} MB/s)")
        parts += [f"{n} {b / payload:.1f}" for n, b in self.written.items()]
        return "disk writes per payload byte: " + ", ".join(parts)

    def cpu_seconds(self) -> float:
        """CPU seconds of every measured process together over the interval."""
        return sum(self.used.values())

    def cores(self) -> str:
        """'client 0.71, broker 0.95': average cores busy, per process."""
        if self.wall <= 0:
            return ""
        parts = [f"{n} {s / self.wall:.2f}" for n, s in self.used.items()]
        return "cores busy: " + ", ".join(parts)

    def _read_written(self) -> dict[str, int]:
        return {name: tree_written(p) for name, p in self.processes.items()}

    def _read(self) -> dict[str, float]:
        readings = {}
        if self.self_label:
            readings[self.self_label] = time.process_time()
        if self.children_label:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            readings[self.children_label] = usage.ru_utime + usage.ru_stime
        for name, process in self.processes.items():
            readings[name] = tree_cpu_seconds(process)
        return readings


def broker_process() -> psutil.Process | None:
    """The RabbitMQ node's Erlang VM, as rabbitmqctl reports it."""
    try:
        result = subprocess.run(
            ["rabbitmqctl", "eval", "os:getpid()."],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return psutil.Process(int(result.stdout.strip().strip('"')))
    except (OSError, subprocess.SubprocessError, ValueError, psutil.Error):
        return None


def named_process(name: str, hint: str = "") -> psutil.Process | None:
    """The first process called `name` whose command line contains `hint`."""
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["name"] == name and hint in cmdline:
            return process
    return None


def machine() -> dict[str, str]:
    """Cores, memory, CPU model and kernel: what a reader needs to compare."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    memory = psutil.virtual_memory().total
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{memory / (1024**3):.1f} GiB",
        "cpu": model or "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def megabytes(size: int) -> float:
    return size / MB


def payload_per_cpu_second(
    kind: str, queue_type: str, chunk: int, payload_bytes: int, meter: CpuMeter
) -> Figure:
    """MB moved per CPU second of every process the meter watched.

    On a machine whose cores are shared by every process of a run, this
    ratio, set beside the bare client's, is the rate ratio to expect when
    both keep the same number of cores busy.
    """
    spent = meter.cpu_seconds()
    who = ", ".join(f"{name} {seconds:.1f}" for name, seconds in meter.used.items())
    cores = spent / meter.wall if meter.wall > 0 else 0.0
    return Figure(
        f"cpu/{kind}/{queue_type}/{chunk}",
        f"{kind} payload per CPU second, {size_name(chunk)} chunks",
        payload_bytes / MB / spent if spent > 0 else 0.0,
        "MB/cpu-s",
        f"{spent:.1f} CPU seconds for {payload_bytes / MB:.0f} MB ({who}) in "
        f"{meter.wall:.2f} s, {cores:.2f} cores busy on average",
    )
