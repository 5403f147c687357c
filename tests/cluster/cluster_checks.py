"""What the cluster tests share: source files, robots that send them, and the
end-to-end check that each file is stored exactly once and byte-identical."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika

from datahaul.broker import topology
from datahaul.config import Settings
from datahaul.faults.rabbit import queue_stats
from datahaul.sender import Sender, SendResult, default_file_id
from datahaul.storage.catalog import Catalog

KiB = 1024
MiB = 1024 * KiB
CHUNK_SIZE = 256 * KiB
STORE_TIMEOUT = 120.0

# (type, smallest, largest size in bytes) of the files a robot carries.
MIX = (
    ("video", 1 * MiB, 5 * MiB // 2),
    ("image", 200 * KiB, 600 * KiB),
    ("text", 10 * KiB, 60 * KiB),
)


@dataclass(frozen=True)
class Source:
    path: Path
    type: str
    sha256: str
    size: int
    file_id: str


def make_sources(
    folder: Path,
    count: int,
    seed: int,
    mix: Sequence[tuple[str, int, int]] = MIX,
) -> list[Source]:
    """count files of mixed types and sizes, each with content of its own."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for index in range(count):
        data_type, smallest, largest = mix[index % len(mix)]
        size = rng.randint(smallest, largest)
        content = rng.randbytes(size)
        if data_type == "text":
            content = content.hex().encode()[:size]
        path = folder / f"{data_type}-{seed}-{index}.{_suffix(data_type)}"
        path.write_bytes(content)
        sources.append(
            Source(
                path,
                data_type,
                hashlib.sha256(content).hexdigest(),
                size,
                default_file_id(content),
            )
        )
    return sources


def _suffix(data_type: str) -> str:
    return {"video": "mp4", "image": "jpg", "text": "txt"}[data_type]


class Robots:
    """Robots that each send their files one after another through one gateway.

    `fault` runs once `after` files are through, while the robots go on
    sending; each robot holds its last file back until the fault is over, so
    that there is traffic both while the fault strikes and after it.
    """

    def __init__(self, gateway_url: str, loads: Sequence[Sequence[Source]]) -> None:
        self.gateway_url = gateway_url
        self.loads = loads
        self.results: list[SendResult] = []
        self.files_done_at_fault: int | None = None
        self._done = 0
        self._progress = asyncio.Condition()
        self._fault_over = asyncio.Event()

    @property
    def total(self) -> int:
        return sum(len(load) for load in self.loads)

    async def run(
        self, fault: Callable[[], Awaitable[None]] | None = None, after: int = 0
    ) -> list[SendResult]:
        async with Sender(self.gateway_url, concurrency=4) as sender:
            robots = [
                asyncio.create_task(self._robot(sender, load)) for load in self.loads
            ]
            try:
                if fault is not None:
                    async with self._progress:
                        await self._progress.wait_for(lambda: self._done >= after)
                    self.files_done_at_fault = self._done
                    await fault()
                self._fault_over.set()
                await asyncio.gather(*robots)
            finally:
                for robot in robots:
                    robot.cancel()
        return self.results

    async def _robot(self, sender: Sender, load: Sequence[Source]) -> None:
        for index, source in enumerate(load):
            if index == len(load) - 1:
                await self._fault_over.wait()
            result = await sender.send_file(
                source.path, type=source.type, chunk_size=CHUNK_SIZE
            )
            self.results.append(result)
            async with self._progress:
                self._done += 1
                self._progress.notify_all()


def sent_files(
    sources: Sequence[Source], results: Sequence[SendResult]
) -> dict[str, Source]:
    """Each sent file's id and its source, matched by content."""
    by_id = {source.file_id: source for source in sources}
    assert len(results) == len(sources)
    assert {result.file_id for result in results} == set(by_id)
    return {result.file_id: by_id[result.file_id] for result in results}


def assert_stored_once(
    catalog_url: str, files: Mapping[str, Source], staging: Path
) -> None:
    """Every file stored once (one row, state stored), byte-identical, and
    nothing of it left in staging."""
    file_ids = list(files)
    catalog = Catalog.open(catalog_url)
    try:
        _wait_final(catalog, file_ids)
        for file_id, source in files.items():
            rows = catalog.db.query(
                "SELECT state, sha256, size FROM files WHERE file_id = ?", (file_id,)
            )
            assert [tuple(row) for row in rows] == [
                ("stored", source.sha256, source.size)
            ], f"{source.path.name} ({file_id})"
            stored = _stored_bytes(catalog, file_id)
            assert hashlib.sha256(stored).hexdigest() == source.sha256
        _wait_unstaged(catalog, file_ids, staging)
    finally:
        catalog.close()


def _wait_final(catalog: Catalog, file_ids: Sequence[str]) -> None:
    deadline = time.monotonic() + STORE_TIMEOUT
    while True:
        states = catalog.states(file_ids)
        if all(states.get(f) in ("stored", "failed") for f in file_ids):
            return
        if time.monotonic() > deadline:
            waiting = {f: states.get(f) for f in file_ids if states.get(f) != "stored"}
            raise AssertionError(f"files not final in {STORE_TIMEOUT:g}s: {waiting}")
        time.sleep(0.2)


def _stored_bytes(catalog: Catalog, file_id: str) -> bytes:
    record = catalog.get(file_id)
    assert record is not None, file_id
    assert record.location, file_id
    if record.location.startswith("catalog:texts/"):
        content = catalog.text(file_id)
        assert content is not None, file_id
        return content
    location = urlsplit(record.location)
    assert location.scheme == "file", record.location
    return Path(location.path).read_bytes()


def _wait_unstaged(catalog: Catalog, file_ids: Sequence[str], staging: Path) -> None:
    """No chunk row and no staged folder left; the sweep may take a moment."""
    deadline = time.monotonic() + 20.0
    while True:
        placeholders = ", ".join("?" for _ in file_ids)
        rows = catalog.db.query(
            f"SELECT COUNT(*) FROM chunks WHERE file_id IN ({placeholders})",
            tuple(file_ids),
        )
        chunk_rows = int(rows[0][0])
        folders = sorted(p.name for p in staging.iterdir() if p.name in file_ids)
        if (chunk_rows, folders) == (0, []):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{chunk_rows} chunk rows and staged folders {folders} left over"
            )
        time.sleep(0.5)


def packet_count(source: Source) -> int:
    return max(1, -(-source.size // CHUNK_SIZE))


def post_packets(gateway_url: str, source: Source, seqs: Iterable[int]) -> None:
    """Send some packets of a source as JSON, the way a robot without the
    sender would; fail unless the gateway takes them all."""
    content = source.path.read_bytes()
    total = packet_count(source)
    packets = []
    for seq in seqs:
        data = content[(seq - 1) * CHUNK_SIZE : seq * CHUNK_SIZE]
        packets.append(
            {
                "type": source.type,
                "file_id": source.file_id,
                "seq": seq,
                "total_seq": total,
                "data": base64.b64encode(data).decode(),
                "file_name": source.path.name,
                "chunk_sha256": hashlib.sha256(data).hexdigest(),
                "file_sha256": source.sha256,
            }
        )
    request = urllib.request.Request(
        f"{gateway_url}/v1/packets",
        data=json.dumps(packets).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert 200 <= answer.status < 300, answer.status


def wait_received(catalog_url: str, expected: Mapping[str, int]) -> None:
    """Wait until the catalog has recorded this many packets of each file."""
    catalog = Catalog.open(catalog_url)
    deadline = time.monotonic() + 60.0
    try:
        while True:
            received = {
                file_id: record.received if record else 0
                for file_id in expected
                for record in [catalog.get(file_id)]
            }
            if received == dict(expected):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"received {received}, expected {expected}")
            time.sleep(0.2)
    finally:
        catalog.close()


def gateway_health(gateway_url: str) -> dict[str, object]:
    request = urllib.request.Request(f"{gateway_url}/healthz")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            body: dict[str, object] = json.loads(answer.read())
    except urllib.error.HTTPError as error:
        body = json.loads(error.read())
    return body


def wait_outbox_empty(gateway_url: str, within: float = 60.0) -> dict[str, object]:
    """The gateway's health once its outbox holds nothing; fail if it never does."""
    deadline = time.monotonic() + within
    while True:
        health = gateway_health(gateway_url)
        outbox = health.get("outbox")
        if isinstance(outbox, dict) and outbox.get("packets") == 0:
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox not drained in {within:g}s: {health}")
        time.sleep(0.2)


async def dead_letters(amqp_url: str) -> int:
    """Messages waiting in the dead-letter queue."""
    return (await queue_stats(amqp_url, topology.DEAD_QUEUE)).messages


class HostDirs:
    """Hands out a new, empty local directory for each worker 'host'."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[Path] = []

    def new(self) -> Path:
        path = self.root / f"host-{len(self.made) + 1}"
        path.mkdir(parents=True)
        self.made.append(path)
        return path

    def env(self) -> dict[str, str]:
        """Worker settings that point at a new host's own local directory."""
        return {"DATAHAUL_DATA_DIR": str(self.new())}


async def declare_through(url: str, settings: Settings) -> None:
    """Declare datahaul's topology over a connection to one particular node."""
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        await topology.declare(await connection.channel(), settings)
