"""The sender's parts that need no gateway: sizes, types, chunks, retries, batches."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
import typer
import xxhash
from aiohttp import web
from typer.testing import CliRunner

from datahaul.cli import send as send_command
from datahaul.errors import ConfigError
from datahaul.protocol import wire
from datahaul.protocol.packet import Packet, check, xxh128_of
from datahaul.sender import (
    GatewayUnavailable,
    RetryPolicy,
    Sender,
    infer_type,
    parse_size,
)
from datahaul.sender.batching import Batcher, Queued, Settlement, accept_all
from datahaul.sender.chunking import (
    MAX_CHUNK_SIZE,
    BytesSource,
    ChunkPlan,
    FileSource,
    PendingSha256,
    check_file_id,
    check_type,
    content_id,
    default_file_id,
    seqs_in_ranges,
    sha256_of,
)
from datahaul.sender.client import (
    LARGE_RUN_BYTES,
    SLOT_BYTES,
    _FileSend,
    _header_name,
    _query_fields,
)
from datahaul.sender.errors import FileChanged
from datahaul.sender.retry import Outcome, classify, parse_retry_after

DATAHAUL = Path(sys.executable).parent / "datahaul"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("256K", 256 * 1024),
        ("256k", 256 * 1024),
        ("256KiB", 256 * 1024),
        ("256kb", 256 * 1024),
        ("1M", 1024 * 1024),
        ("1.5MiB", 1536 * 1024),
        ("16M", MAX_CHUNK_SIZE),
        (" 64 K ", 64 * 1024),
        (4096, 4096),
    ],
)
def test_parse_size_reads_bytes_and_binary_suffixes(text: str | int, size: int) -> None:
    """Plain byte counts and K/M suffixes (powers of two) are read as bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0", "at least 1 byte"),
        ("0K", "at least 1 byte"),
        ("17M", "over the limit"),
        ("16777217", "over the limit"),
        ("1G", "over the limit"),
        ("-1", "not a size"),
        ("lots", "not a size"),
        ("1T", "not a size"),
        ("", "not a size"),
    ],
)
def test_parse_size_refuses_zero_huge_and_garbage(text: str, says: str) -> None:
    """Zero, sizes over 16 MiB and unreadable sizes are refused with the reason."""
    with pytest.raises(ConfigError, match=says):
        parse_size(text)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("drive.log", "text"),
        ("imu.csv", "text"),
        ("events.ndjson", "text"),
        ("events.jsonl", "text"),
        ("notes.txt", "text"),
        ("state.json", "text"),
        ("LIDAR.LOG", "text"),
        ("front.png", "image"),
        ("rear.JPG", "image"),
        ("clip.mp4", "video"),
        ("clip.webm", "video"),
    ],
)
def test_infer_type_from_the_file_name(name: str, kind: str) -> None:
    """Telemetry formats are text, image/* is image, video/* is video."""
    assert infer_type(name) == kind


@pytest.mark.parametrize("name", ["blob.bin", "archive.zip", "no-suffix", "a.pdf"])
def test_infer_type_refuses_other_files_and_asks_for_type(name: str) -> None:
    """A file that is neither text, image nor video is an error naming --type."""
    with pytest.raises(ConfigError, match=r"pass --type text\|image\|video") as caught:
        infer_type(name)
    assert name in str(caught.value)


def test_check_type_and_file_id_refuse_what_the_protocol_refuses() -> None:
    """A type outside text/image/video and an unsafe file id are refused early."""
    assert check_type("video") == "video"
    assert check_file_id("robot-7.drive_0042") == "robot-7.drive_0042"
    with pytest.raises(ConfigError, match="not one of text, image, video"):
        check_type("audio")
    for bad in ("../etc", "-x", "a/b", "x" * 129, ""):
        with pytest.raises(ConfigError, match="not allowed"):
            check_file_id(bad)


def test_default_file_id_is_the_xxh128_of_the_content() -> None:
    """The default id is the content's XXH128, 32 hex digits, however the
    content is read."""
    content = random.Random(3).randbytes(3 * 1024 * 1024 + 5)
    expected = xxhash.xxh3_128_hexdigest(content)
    assert default_file_id(content) == expected
    assert content_id(BytesSource(content)) == expected
    assert check_file_id(expected)
    assert len(expected) == 32


@pytest.mark.parametrize(
    ("size", "chunk", "total"),
    [(0, 10, 1), (1, 10, 1), (10, 10, 1), (11, 10, 2), (95, 10, 10), (100, 10, 10)],
)
def test_chunk_plan_covers_every_byte_once(size: int, chunk: int, total: int) -> None:
    """Chunks start where the last ended, are full but the last, and cover the file."""
    plan = ChunkPlan(size, chunk)
    assert plan.total_seq == total
    spans = [(plan.offset(seq), plan.length(seq)) for seq in range(1, total + 1)]
    assert sum(length for _, length in spans) == size
    for (offset, length), (next_offset, _) in itertools.pairwise(spans):
        assert offset + length == next_offset
        assert length == chunk
    with pytest.raises(ValueError, match="outside"):
        plan.length(total + 1)


def test_file_chunks_reassemble_into_the_file(tmp_path: Path) -> None:
    """Reading a file chunk by chunk gives back its bytes and its SHA-256."""
    content = random.Random(7).randbytes(100_003)
    path = tmp_path / "clip.mp4"
    path.write_bytes(content)
    source = FileSource(path)
    try:
        plan = ChunkPlan(source.size, 4096)
        chunks = [
            source.read(plan.offset(seq), plan.length(seq))
            for seq in range(1, plan.total_seq + 1)
        ]
        assert sha256_of(source) == hashlib.sha256(content).hexdigest()
    finally:
        source.close()
    assert b"".join(chunks) == content
    assert plan.total_seq == 25


def test_hashing_a_file_holds_only_a_block_in_memory(tmp_path: Path) -> None:
    """Hashing a 24 MiB file allocates a few MiB at most, not the whole file."""
    path = tmp_path / "big.mp4"
    with path.open("wb") as out:
        for _ in range(24):
            out.write(random.randbytes(1024 * 1024))
    source = FileSource(path)
    tracemalloc.start()
    try:
        digest = sha256_of(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        source.close()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert peak < 4 * 1024 * 1024


def test_a_file_written_to_while_sent_is_noticed(tmp_path: Path) -> None:
    """Appending to a file after it was opened makes the send fail, not corrupt."""
    path = tmp_path / "growing.log"
    path.write_bytes(b"line\n" * 100)
    source = FileSource(path)
    try:
        source.check_unchanged()
        with path.open("ab") as out:
            out.write(b"another line\n")
        with pytest.raises(FileChanged, match="changed while it was being sent"):
            source.check_unchanged()
    finally:
        source.close()


def test_packets_carry_checksums_the_gateway_accepts() -> None:
    """Each packet has its chunk's XXH128 and the file's XXH128 and SHA-256,
    and passes the check."""
    data = b"0123456789" * 50
    source = BytesSource(data)
    sha = sha256_of(source)
    state = _FileSend(
        source="t.csv",
        file_id=default_file_id(data),
        file_name="t.csv",
        type="text",
        content_type="text/csv",
        device_id="robot-7",
        metadata={"run": 7},
        xxh128=default_file_id(data),
        sha256=PendingSha256(None, sha),
        plan=ChunkPlan(len(data), 64),
    )
    packets = [
        state.packet(seq, source.read(state.plan.offset(seq), state.plan.length(seq)))
        for seq in range(1, state.plan.total_seq + 1)
    ]
    wire = msgspec.json.encode(packets)
    decoded = msgspec.json.decode(wire, type=list[Packet])
    for packet in decoded:
        check(packet, MAX_CHUNK_SIZE)
        assert packet.chunk_xxh128 == xxh128_of(packet.data)
        assert packet.file_sha256 == hashlib.sha256(data).hexdigest()
        assert packet.file_xxh128 == xxhash.xxh3_128_hexdigest(data)
        assert packet.total_seq == 8
    assert b"".join(p.data for p in decoded) == data


def _video_send(file_name: str, metadata: dict[str, object] | None) -> _FileSend:
    return _FileSend(
        source=file_name,
        file_id="clip",
        file_name=file_name,
        type="video",
        content_type="video/mp4",
        device_id="robot-7",
        metadata=metadata,
        xxh128="0" * 32,
        sha256=None,
        plan=ChunkPlan(10_000_000, 1024 * 1024),
    )


def test_raw_put_fields_fit_http_headers() -> None:
    """Fields go in X-Datahaul-* headers; non-ASCII names go in the query instead."""
    plain = _video_send("clip.mp4", {"route": "Straße 7"})
    fields = plain.raw_fields
    assert fields["total_seq"] == "10"
    assert fields["metadata"].isascii()
    assert _header_name("chunk_xxh128") == "X-Datahaul-Chunk-Xxh128"
    assert _header_name("total_seq") == "X-Datahaul-Total-Seq"
    assert _query_fields(plain) == {}

    accented = _video_send("Ünïcode clip.mp4", None)
    assert "file_name" not in accented.raw_fields
    assert _query_fields(accented) == {"file_name": "Ünïcode clip.mp4"}


def test_fields_too_large_for_headers_send_the_file_as_json() -> None:
    """Metadata past the header budget sends every packet in a JSON body."""
    assert _video_send("clip.mp4", {"notes": "x" * 5000}).raw_fields == {}


def test_missing_ranges_become_the_seqs_to_send() -> None:
    """The gateway's inclusive [first, last] ranges expand to each missing seq."""
    assert seqs_in_ranges([[1, 2], [5, 5], [7, 9]], 9) == [1, 2, 5, 7, 8, 9]
    assert seqs_in_ranges([], 9) == []
    with pytest.raises(ValueError, match="outside"):
        seqs_in_ranges([[3, 12]], 9)


@pytest.mark.parametrize(
    ("status", "retry_after", "outcome"),
    [
        (200, None, Outcome.SUCCESS),
        (202, None, Outcome.SUCCESS),
        (400, None, Outcome.REJECTED),
        (404, None, Outcome.REJECTED),
        (409, None, Outcome.REJECTED),
        (413, None, Outcome.REJECTED),
        (429, None, Outcome.REJECTED),
        (429, "3", Outcome.BUSY),
        (503, "5", Outcome.BUSY),
        (503, None, Outcome.TRANSIENT),
        (500, None, Outcome.TRANSIENT),
        (502, None, Outcome.TRANSIENT),
        (408, None, Outcome.TRANSIENT),
        (None, None, Outcome.TRANSIENT),
    ],
)
def test_answers_are_classified_for_retrying(
    status: int | None, retry_after: str | None, outcome: Outcome
) -> None:
    """4xx is final, 503 with Retry-After waits, 5xx and no answer back off."""
    assert classify(status, retry_after) is outcome


def test_retry_after_reads_seconds_and_dates() -> None:
    """Retry-After is read as seconds or as an HTTP date; junk gives None."""
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(later, now=now) == pytest.approx(30.0)
    assert parse_retry_after("soon") is None


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    """Each wait lies in [ceiling/2, ceiling], the ceiling doubling up to max_delay."""
    policy = RetryPolicy(attempts=10, base_delay=0.5, max_delay=4.0)
    rng = random.Random(1)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 4.0)]:
        waits = {policy.backoff(failures, rng) for _ in range(200)}
        assert min(waits) >= ceiling / 2
        assert max(waits) <= ceiling
        assert len(waits) > 100


def test_transient_failures_stop_after_the_allowed_attempts() -> None:
    """Connection errors and 5xx are retried attempts-1 times, then given up."""
    budget = RetryPolicy(attempts=4, base_delay=0.1, max_delay=1.0).start()
    delays = [budget.next_delay(None, None), budget.next_delay(502, None)]
    delays.append(budget.next_delay(500, None))
    assert all(delay is not None and delay > 0 for delay in delays)
    assert budget.next_delay(None, None) is None
    assert budget.attempts_made == 4


def test_a_rejection_is_never_retried() -> None:
    """A 4xx gets no second attempt, whatever budget is left."""
    budget = RetryPolicy(attempts=8).start()
    assert budget.next_delay(400, None) is None
    assert budget.next_delay(409, "5") is None


def test_busy_waits_follow_retry_after_on_their_own_budget() -> None:
    """503 + Retry-After waits as asked, capped, without spending attempts."""
    policy = RetryPolicy(attempts=2, max_retry_after=10.0, max_busy_wait=25.0)
    budget = policy.start()
    assert budget.next_delay(503, "3") == 3.0
    assert budget.next_delay(503, "120") == 10.0
    assert budget.next_delay(429, "10") == 10.0
    assert budget.failures == 0
    assert budget.next_delay(503, "5") is None


def test_retry_policy_refuses_nonsense() -> None:
    """Zero attempts or a cap below the base delay are configuration errors."""
    with pytest.raises(ConfigError, match="at least 1"):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigError, match="base_delay <= max_delay"):
        RetryPolicy(base_delay=2.0, max_delay=1.0)


async def test_batches_stay_within_their_limits_and_lose_nothing() -> None:
    """Every queued packet is posted once, in order, in batches under the limits."""
    slots = asyncio.Semaphore(2)
    posted: list[list[Queued]] = []

    accepted: list[tuple[int, int]] = []

    async def post(batch: list[Queued]) -> None:
        try:
            posted.append(batch)
            await asyncio.sleep(0.001)
            accept_all(batch, False)
        finally:
            slots.release()

    batcher = Batcher(post, slots, max_bytes=1000, max_packets=7)
    dispatcher = asyncio.create_task(batcher.run())
    settlement = Settlement(
        lambda packets, length, _: accepted.append((packets, length))
    )
    items = [
        Queued("f", seq, b"x" * (10 + seq % 90), seq, settlement)
        for seq in range(1, 401)
    ]
    try:
        for start in range(0, 400, 50):
            await batcher.add(items[start : start + 50])
        await asyncio.wait_for(settlement.wait(), 5)
    finally:
        dispatcher.cancel()
        await batcher.close()
    assert [item.seq for batch in posted for item in batch] == list(range(1, 401))
    assert all(len(batch) <= 7 for batch in posted)
    assert all(sum(len(i.encoded) + 1 for i in batch) <= 1001 for batch in posted)
    assert max(len(batch) for batch in posted) == 7
    assert sum(packets for packets, _ in accepted) == 400
    assert sum(length for _, length in accepted) == sum(range(1, 401))


async def test_a_settlement_waits_for_every_packet_and_carries_the_first_error() -> (
    None
):
    """One file's answer comes once all its packets are taken, or with its error."""
    heard: list[int] = []
    whole = Settlement(lambda packets, _, __: heard.append(packets))
    whole.expect(3)
    whole.accepted(2, 20, False)
    waiting = asyncio.create_task(whole.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    whole.accepted(1, 10, True)
    await asyncio.wait_for(waiting, 1)
    assert heard == [2, 1]

    broken = Settlement(lambda *_: None)
    broken.expect(2)
    broken.failed(ValueError("first"))
    broken.failed(ValueError("second"))
    broken.accepted(2, 20, False)
    with pytest.raises(ValueError, match="first"):
        await broken.wait()


async def test_producers_wait_while_the_batch_is_full() -> None:
    """With no request slot free, adding past a full batch blocks the producer."""
    slots = asyncio.Semaphore(0)

    async def post(batch: list[Queued]) -> None:
        slots.release()

    batcher = Batcher(post, slots, max_bytes=10_000, max_packets=3)
    dispatcher = asyncio.create_task(batcher.run())
    settlement = Settlement(lambda *_: None)
    try:
        await batcher.add([Queued("f", seq, b"x", 1, settlement) for seq in range(3)])
        blocked = asyncio.create_task(
            batcher.add([Queued("f", 4, b"x", 1, settlement)])
        )
        await asyncio.sleep(0.05)
        assert not blocked.done()
        slots.release()
        await asyncio.wait_for(blocked, 1)
    finally:
        dispatcher.cancel()
        await batcher.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_unreachable_gateway_fails_after_the_allowed_attempts() -> None:
    """Connection refused is retried as configured, then named in a clear error."""
    url = f"http://127.0.0.1:{_closed_port()}"
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
    async with Sender(url, retry=policy) as sender:
        with pytest.raises(GatewayUnavailable) as caught:
            await sender.send_bytes(b"hello\n", type="text", file_name="hello.txt")
    message = str(caught.value)
    assert url in message
    assert "after 3 attempts" in message
    assert "datahaul gateway" in message


def test_sender_refuses_a_bad_url_or_concurrency() -> None:
    """A gateway address that is not http(s), or no concurrency, is refused."""
    with pytest.raises(ConfigError, match="not an http"):
        Sender("127.0.0.1:8080")
    with pytest.raises(ConfigError, match="at least 1"):
        Sender("http://127.0.0.1:8080", concurrency=0)


@pytest.fixture(scope="module")
def send_app() -> typer.Typer:
    """A command-line app holding only `send`, run in this process."""
    app = typer.Typer()
    app.callback()(lambda: None)
    send_command.register(app)
    return app


def _send_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DATAHAUL), "send", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_refuses_bad_arguments_before_sending(
    tmp_path: Path, send_app: typer.Typer
) -> None:
    """Bad chunk sizes, unknown types, directories and missing files exit 2."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00" * 10)
    log = tmp_path / "a.log"
    log.write_text("x\n")
    cases = [
        ([str(log), "--chunk-size", "0"], "at least 1 byte"),
        ([str(log), "--chunk-size", "32M"], "over the limit"),
        ([str(blob)], "pass --type text|image|video"),
        ([str(tmp_path)], "is a directory"),
        ([str(tmp_path / "gone.log")], "does not exist"),
        ([str(log), "--type", "audio"], "not one of text, image, video"),
        ([str(log), str(blob), "--type", "text", "--file-id", "x"], "one file"),
        ([str(log), "--file-id", "../x"], "not allowed"),
        ([str(log), "--metadata", "[1]"], "JSON object"),
        ([str(log), "--gateway", "ftp://host"], "not an http"),
        ([str(log), "--concurrency", "0"], "at least 1"),
    ]
    for args, says in cases:
        result = CliRunner().invoke(send_app, ["send", "--no-progress", *args])
        assert result.exit_code == 2, (args, result.output)
        assert says in result.stderr, (args, result.stderr)


def test_cli_reports_an_unreachable_gateway(tmp_path: Path) -> None:
    """With nothing listening, the command names the gateway and exits 4."""
    log = tmp_path / "a.log"
    log.write_text("x\n")
    url = f"http://127.0.0.1:{_closed_port()}"
    result = _send_cli(str(log), "--gateway", url, "--attempts", "2", "--json")
    assert result.returncode == 4, result.stderr
    assert url in result.stderr
    rows = msgspec.json.decode(result.stdout)
    assert rows[0]["status"] == "failed"
    assert rows[0]["error"] == "GatewayUnavailable"


async def test_a_gateway_without_the_status_question_is_asked_file_by_file(
    tmp_path: Path,
) -> None:
    """A gateway from before POST /v1/files/status and /v1/chunks answers
    them 405 and 404; the sender then asks it one GET per file and sends
    one PUT per large chunk, and still resumes."""
    done, fresh = tmp_path / "done.log", tmp_path / "fresh.log"
    done.write_text("a\n" * 40_000)
    fresh.write_text("b\n" * 40_000)
    video = tmp_path / "drive.mp4"
    video.write_bytes(random.Random(5).randbytes(700_000))
    done_id = default_file_id(done.read_bytes())
    asked: list[str] = []
    posted: list[str] = []
    put: list[int] = []

    async def get_file(request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        asked.append(file_id)
        if file_id != done_id:
            return web.json_response({"error": "NotFound"}, status=404)
        status = {"type": "text", "total_seq": 20, "complete": True, "missing": []}
        return web.json_response(status)

    async def post_packets(request: web.Request) -> web.Response:
        packets = await request.json()
        posted.extend(packet["file_id"] for packet in packets)
        return web.json_response({"accepted": len(packets), "buffered": 0})

    async def put_chunk(request: web.Request) -> web.Response:
        chunk = await request.read()
        assert xxh128_of(chunk) == request.headers["X-Datahaul-Chunk-Xxh128"]
        put.append(int(request.match_info["seq"]))
        return web.json_response({"accepted": 1, "buffered": 0})

    older = web.Application()
    older.router.add_get("/v1/files/{file_id}", get_file)
    older.router.add_post("/v1/packets", post_packets)
    older.router.add_put("/v1/files/{file_id}/chunks/{seq}", put_chunk)
    async with _serving(older) as url, Sender(url) as sender:
        results = await sender.send_files([done, fresh], chunk_size="4K")
        sent_video = await sender.send_file(video, chunk_size="100K")

    assert [getattr(r, "status", r) for r in results] == ["already sent", "sent"]
    assert sorted(asked) == sorted([done_id, results[1].file_id, sent_video.file_id])
    assert set(posted) == {results[1].file_id}
    assert sorted(put) == list(range(1, 8))
    assert sent_video.packets_sent == 7


@pytest.mark.parametrize(("chunk", "per_run"), [("256K", 8), ("1M", 2)])
async def test_large_chunks_go_in_runs_and_runs_in_flight_are_bounded_in_bytes(
    tmp_path: Path, chunk: str, per_run: int
) -> None:
    """Consecutive large chunks travel up to LARGE_RUN_BYTES a request, and
    no more than concurrency x SLOT_BYTES of them are in flight at once."""
    video = tmp_path / "drive.mp4"
    video.write_bytes(random.Random(9).randbytes(24 * 1024 * 1024))
    runs: list[int] = []
    in_flight = {"now": 0, "most": 0}

    async def post_chunks(request: web.Request) -> web.Response:
        in_flight["now"] += 1
        in_flight["most"] = max(in_flight["most"], in_flight["now"])
        try:
            frames = wire.decode_frames(await request.read())
            runs.append(len(frames))
            await asyncio.sleep(0.02)
            return web.json_response({"accepted": len(frames), "buffered": 0})
        finally:
            in_flight["now"] -= 1

    async def not_known(request: web.Request) -> web.Response:
        return web.json_response({"error": "NotFound"}, status=404)

    gateway = web.Application(client_max_size=4 * LARGE_RUN_BYTES)
    gateway.router.add_post("/v1/files/status", not_known)
    gateway.router.add_get("/v1/files/{file_id}", not_known)
    gateway.router.add_post("/v1/chunks", post_chunks)
    async with _serving(gateway) as url, Sender(url, concurrency=8) as sender:
        sent = await sender.send_file(video, chunk_size=chunk)

    assert sent.status == "sent"
    assert runs == [per_run] * (sum(runs) // per_run)
    assert LARGE_RUN_BYTES == 2 * SLOT_BYTES
    assert in_flight["most"] == 8 * SLOT_BYTES // LARGE_RUN_BYTES


async def test_packets_leave_before_the_sha256_and_the_last_run_carries_it(
    tmp_path: Path,
) -> None:
    """Asked for a SHA-256, a large file's first runs leave without waiting
    for it; the run that holds its last packet waits for it and carries it.
    Every packet names the file's XXH128."""
    video = tmp_path / "drive.mp4"
    content = random.Random(11).randbytes(8 * 1024 * 1024)
    video.write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    digests = SimpleNamespace(xxh128=Future(), sha256=Future())
    digests.xxh128.set_result(default_file_id(content))
    runs: list[list[Packet]] = []

    async def post_chunks(request: web.Request) -> web.Response:
        frames = wire.decode_frames(await request.read())
        runs.append(frames)
        if len(runs) == 2:
            digests.sha256.set_result(sha)
        return web.json_response({"accepted": len(frames), "buffered": 0})

    async def not_known(request: web.Request) -> web.Response:
        return web.json_response({"error": "NotFound"}, status=404)

    gateway = web.Application(client_max_size=4 * LARGE_RUN_BYTES)
    gateway.router.add_post("/v1/files/status", not_known)
    gateway.router.add_post("/v1/chunks", post_chunks)
    async with (
        _serving(gateway) as url,
        Sender(
            url, concurrency=1, known_digests=lambda _: digests, sha256=True
        ) as sender,
    ):
        sent = await sender.send_file(video, chunk_size="256K")

    assert (sent.file_id, sent.sha256) == (default_file_id(content), sha)
    assert {p.file_xxh128 for run in runs for p in run} == {sent.file_id}
    assert [p.file_sha256 for p in runs[0]] == [None] * 8
    assert [p.file_sha256 for p in runs[-1]] == [sha] * 8
    assert runs[-1][-1].seq == 32
    assert b"".join(p.data for run in runs for p in run) == content


@contextlib.asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[str]:
    """Serve a stand-in gateway on a free port of 127.0.0.1; its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
