"""The sender against a real gateway process, on a RabbitMQ vhost of its own."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from datahaul.cli.early_hash import EARLY_BYTES
from datahaul.sender import (
    GatewayRejected,
    GatewayUnavailable,
    ProgressEvent,
    RetryPolicy,
    Sender,
    SendResult,
    default_file_id,
)
from pipeline_helpers import post_packets

DATAHAUL = Path(sys.executable).parent / "datahaul"
BROKER = "amqp://guest:guest@127.0.0.1:5672/"
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2)

StartProcess = Callable[..., str]


def _rabbitmqctl(*args: str) -> None:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def vhost(rabbitmq: None) -> Iterator[str]:
    """A fresh vhost for this module's gateways, deleted with its queues after."""
    name = f"datahaul-sender-{secrets.token_hex(4)}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    _rabbitmqctl("delete_vhost", name)


@pytest.fixture
def env(vhost: str, tmp_path: Path) -> dict[str, str]:
    """DATAHAUL_* for this test's processes: the vhost and a data dir of its own."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return {
        **os.environ,
        "DATAHAUL_AMQP_URL": BROKER + vhost,
        "DATAHAUL_DATA_DIR": str(data_dir),
    }


@pytest.fixture
def start(env: dict[str, str], tmp_path: Path) -> Iterator[StartProcess]:
    """Start `datahaul gateway` or `datahaul worker` processes, stopped at the end.

    For a gateway it returns its URL once /healthz answers and, unless
    broker_up=False, says the broker link is up.
    """
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def run(
        command: str,
        *args: str,
        extra: dict[str, str] | None = None,
        broker_up: bool = True,
    ) -> str:
        log = tmp_path / f"{command}-{len(processes)}.log"
        port = _free_port()
        argv = [str(DATAHAUL), command, *args]
        if command == "gateway":
            argv += ["--port", str(port)]
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, env={**env, **(extra or {})}, stdout=out, stderr=out
            )
        processes.append((process, log))
        url = f"http://127.0.0.1:{port}"
        if command == "gateway":
            _wait_healthy(url, process, log, broker_up=broker_up)
        return url

    yield run
    for process, _ in processes:
        process.send_signal(signal.SIGTERM)
    for process, log in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            print(f"{log.name} did not stop on SIGTERM:\n{log.read_text()[-3000:]}")


def _wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, *, broker_up: bool
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the gateway exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as answer:
                if json.load(answer).get("broker") == "up" or not broker_up:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(
        f"the gateway at {url} never became healthy:\n{log.read_text()[-3000:]}"
    )


def _write(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def _file_status(url: str, file_id: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"{url}/v1/files/{file_id}", timeout=5) as answer:
            status: dict[str, object] = json.load(answer)
            return status
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def _stored(
    env: dict[str, str], file_ids: set[str], timeout: float = 120
) -> dict[str, dict[str, object]]:
    """The catalog rows of file_ids once all are stored (one `datahaul files`)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        result = subprocess.run(
            [str(DATAHAUL), "files", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        last = result.stdout[-2000:] + result.stderr[-2000:]
        if result.returncode == 0:
            rows = {row["file_id"]: row for row in json.loads(result.stdout)}
            stored = {
                file_id: rows[file_id]
                for file_id in file_ids
                if rows.get(file_id, {}).get("state") == "stored"
            }
            if len(stored) == len(file_ids):
                return stored
        time.sleep(1)
    pytest.fail(f"not all of {sorted(file_ids)} were stored in {timeout}s: {last}")


async def test_files_of_every_type_arrive_whole(
    start: StartProcess, env: dict[str, str], tmp_path: Path
) -> None:
    """Raw PUTs and batched packets both rebuild each file with the source's SHA-256."""
    gateway = start("gateway")
    start("worker", "--type", "all")
    video = _write(tmp_path / "drive.mp4", 1_500_000, 1)
    image = _write(tmp_path / "front.png", 200_000, 2)
    logs = [tmp_path / f"imu-{n}.ndjson" for n in range(30)]
    for n, path in enumerate(logs):
        path.write_text("".join(f'{{"t": {t}, "n": {n}}}\n' for t in range(n * 20)))
    logs[0].write_text('{"t": 0}\n' * 12_000)
    events: list[ProgressEvent] = []

    async with Sender(gateway, progress=events.append) as sender:
        results = await sender.send_files(
            [video, image, *logs], device_id="robot-7", chunk_size="100K"
        )

    sent = [result for result in results if isinstance(result, SendResult)]
    assert len(sent) == len(results), results
    catalog = _stored(env, {result.file_id for result in sent})
    for path, result in zip([video, image, *logs], sent, strict=True):
        assert result.packets_sent == result.total_seq
        stored = catalog[result.file_id]
        assert stored["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert stored["file_name"] == path.name
        assert stored["device_id"] == "robot-7"
    assert [result.type for result in sent[:3]] == ["video", "image", "text"]
    sent_bytes = sum(e.advance for e in events if e.source == str(video))
    assert sent_bytes == video.stat().st_size


async def test_a_resend_moves_only_what_the_gateway_lacks(
    start: StartProcess, tmp_path: Path
) -> None:
    """An interrupted file resumes with its missing packets; a whole one sends none."""
    gateway = start("gateway")
    video = _write(tmp_path / "long.mp4", 40 * 80_000, 3)
    halfway = asyncio.Event()
    accepted = 0

    def watch(event: ProgressEvent) -> None:
        nonlocal accepted
        accepted += event.advance
        if accepted >= video.stat().st_size // 2:
            halfway.set()

    async with Sender(gateway, concurrency=2, progress=watch) as sender:
        interrupted = asyncio.create_task(sender.send_file(video, chunk_size=80_000))
        await halfway.wait()
        interrupted.cancel()
        with pytest.raises(asyncio.CancelledError):
            await interrupted

    file_id = default_file_id(video.read_bytes())
    status = _file_status(gateway, file_id)
    assert status is not None
    received = status["received"]
    assert isinstance(received, int)
    assert 20 <= received < 40

    async with Sender(gateway) as sender:
        resumed = await sender.send_file(video, chunk_size=80_000)
        again = await sender.send_file(video, chunk_size=80_000)

    # A request cancelled on the client may still finish on the gateway after
    # the status was read, so the resume may find one or two more packets.
    assert received <= resumed.packets_skipped < 40
    assert resumed.packets_sent == 40 - resumed.packets_skipped
    assert (again.packets_skipped, again.packets_sent) == (40, 0)
    whole = _file_status(gateway, file_id)
    assert whole is not None
    assert (whole["received"], whole["missing"], whole["complete"]) == (40, [], True)


async def test_many_files_resume_from_shared_status_questions(
    start: StartProcess, tmp_path: Path
) -> None:
    """Files asked about together each get their own answer: the ones the
    gateway has move nothing, the half-sent one moves its missing packets."""
    gateway = start("gateway")
    logs = [tmp_path / f"log-{n}.ndjson" for n in range(40)]
    for n, path in enumerate(logs):
        path.write_text("".join(f'{{"n": {n}, "t": {t}}}\n' for t in range(6_000)))
    partial = logs[-1].read_bytes()
    total_seq = -(-len(partial) // 4096)
    head = [
        {
            "type": "text",
            "file_id": default_file_id(partial),
            "seq": seq,
            "total_seq": total_seq,
            "data": base64.b64encode(partial[(seq - 1) * 4096 : seq * 4096]).decode(),
        }
        for seq in range(1, 10)
    ]
    assert post_packets(gateway, head)[0] == 200

    async with Sender(gateway) as sender:
        first = await sender.send_files(logs[:20], chunk_size="4K")
        again = await sender.send_files(logs, chunk_size="4K")

    assert all(isinstance(r, SendResult) and r.status == "sent" for r in first)
    done_before = [r for r in again[:20] if isinstance(r, SendResult)]
    assert [r.packets_sent for r in done_before] == [0] * 20
    new = [r for r in again[20:39] if isinstance(r, SendResult)]
    assert [r.packets_skipped for r in new] == [0] * 19
    resumed = again[39]
    assert isinstance(resumed, SendResult), resumed
    assert (resumed.packets_skipped, resumed.packets_sent) == (9, total_seq - 9)


async def test_a_refused_packet_names_its_file_and_spares_the_others(
    start: StartProcess, tmp_path: Path
) -> None:
    """A 4xx fails only its file, naming seq, field and reason; batch mates arrive."""
    gateway = start("gateway", extra={"DATAHAUL_MAX_CHUNK_BYTES": "1000"})
    small = [tmp_path / f"ok-{n}.log" for n in range(20)]
    for n, path in enumerate(small):
        path.write_text(f"line {n}\n" * 40)
    too_big = tmp_path / "too-big.log"
    too_big.write_text("x" * 1500)
    raw = _write(tmp_path / "raw.mp4", 300_000, 4)

    async with Sender(gateway, retry=FAST_RETRY, concurrency=1) as sender:
        results = await sender.send_files([*small, too_big], chunk_size="4K")
        with pytest.raises(GatewayRejected) as put_refused:
            await sender.send_file(raw, chunk_size="100K")

    *fine, refused = results
    assert all(isinstance(r, SendResult) and r.packets_sent == 1 for r in fine)
    assert isinstance(refused, GatewayRejected)
    assert refused.status == 413
    assert (refused.seq, refused.field) == (1, "data")
    assert "over the limit of 1000 bytes" in refused.reason
    assert refused.file_id in str(refused)
    assert "packet 1" in str(put_refused.value)
    assert put_refused.value.field == "data"


def test_the_command_prints_ids_and_resumes(
    start: StartProcess, env: dict[str, str], tmp_path: Path
) -> None:
    """`datahaul send --json` lists each file's id; a second run sends nothing of
    the large file and sends the small one (under 64 KiB) again, unasked."""
    gateway = start("gateway")
    video = _write(tmp_path / "clip.mp4", 700_000, 5)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    command = [str(DATAHAUL), "send", str(video), str(text), "--gateway", gateway]

    first = subprocess.run(
        [*command, "--json"], env=env, capture_output=True, text=True
    )
    second = subprocess.run(command, env=env, capture_output=True, text=True)

    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)
    assert [row["file_id"] for row in rows] == [
        default_file_id(path.read_bytes()) for path in (video, text)
    ]
    assert [row["packets_sent"] for row in rows] == [3, 1]
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already sent") == 1
    for row in rows:
        assert row["file_id"] in second.stdout


def test_the_command_takes_a_large_file_s_id_from_its_early_hash(
    start: StartProcess, env: dict[str, str], tmp_path: Path
) -> None:
    """A file of EARLY_BYTES or more is hashed while `datahaul send` loads;
    the id it prints is its content's XXH128 and, with --sha256, the SHA-256
    it prints the file's."""
    gateway = start("gateway")
    video = _write(tmp_path / "drive.mp4", EARLY_BYTES + 1000, 8)
    command = [str(DATAHAUL), "-v", "send", str(video), "--gateway", gateway]

    sent = subprocess.run(
        [*command, "--json", "--chunk-size", "4M", "--sha256"],
        env=env,
        capture_output=True,
        text=True,
    )

    assert sent.returncode == 0, sent.stderr
    [row] = json.loads(sent.stdout)
    content = video.read_bytes()
    assert row["file_id"] == default_file_id(content)
    assert row["sha256"] == hashlib.sha256(content).hexdigest()
    assert "file.hash_known" in sent.stderr


def _no_broker(quota: int) -> dict[str, str]:
    """Settings for a gateway whose broker never answers, with a small outbox."""
    return {
        "DATAHAUL_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{_free_port()}/",
        "DATAHAUL_OUTBOX_QUOTA_BYTES": str(quota),
    }


async def test_packets_buffered_by_the_gateway_count_as_sent(
    start: StartProcess, tmp_path: Path
) -> None:
    """With the broker away, 202 answers are a success reported as buffered."""
    gateway = start("gateway", extra=_no_broker(10_000_000), broker_up=False)
    video = _write(tmp_path / "offline.mp4", 250_000, 6)
    notes = tmp_path / "offline.log"
    notes.write_text("no coverage\n" * 50)

    async with Sender(gateway) as sender:
        results = await sender.send_files([video, notes], chunk_size="100K")

    assert [(r.packets_sent, r.packets_buffered) for r in results] == [(3, 3), (1, 1)]
    assert [r.status for r in results if isinstance(r, SendResult)] == [
        "buffered",
        "buffered",
    ]


async def test_a_full_outbox_is_waited_for_as_asked_then_reported(
    start: StartProcess, tmp_path: Path
) -> None:
    """503 with Retry-After is retried after that delay, then named as busy."""
    gateway = start("gateway", extra=_no_broker(150_000), broker_up=False)
    first = _write(tmp_path / "first.mp4", 100_000, 7)
    second = _write(tmp_path / "second.mp4", 100_000, 8)
    patient = RetryPolicy(attempts=3, max_busy_wait=7.0)

    async with Sender(gateway, retry=patient) as sender:
        buffered = await sender.send_file(first)
        started = time.monotonic()
        with pytest.raises(GatewayUnavailable) as caught:
            await sender.send_file(second)
        waited = time.monotonic() - started

    assert buffered.packets_buffered == 1
    assert caught.value.attempts == 2
    assert caught.value.last_problem.startswith("HTTP 503")
    assert "still busy" in str(caught.value)
    assert 4.5 <= waited < 30
