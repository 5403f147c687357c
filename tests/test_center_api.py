"""The center API against real catalogs (SQLite and PostgreSQL) and real stores.

Files are put in place by the workers' own core (Assembler.stage and
finalize), so the catalog rows, the text table and the blobs are exactly
what a running pipeline leaves behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from psycopg import sql

from datahaul.broker import topology
from datahaul.center.app import create_app
from datahaul.center.reports import ReportBook, StatusReporter
from datahaul.config import Settings
from datahaul.protocol.packet import Packet
from datahaul.storage.blobs import open_store
from datahaul.storage.catalog import Catalog
from datahaul.worker.assembler import Assembler
from s3server import S3Server

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
PG_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/"
# Texts over 4 KiB go to the blob store, so that both places get tested.
TEXT_LIMITS = {
    name: 4096
    for name in ("max_text_bytes", "inline_text_bytes")
    if name in {spec.name for spec in dataclasses.fields(Settings)}
}
TEXT = "Grüße from robot-2: ünïcödé survives the trip.\n".encode() * 40


@dataclass
class Seeded:
    """What the seeding put in the catalog, to check the API's answers against."""

    data_dir: Path
    catalog_url: str
    blob_url: str
    contents: dict[str, bytes] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    middle: float = 0.0


def packets_of(
    file_id: str, kind: str, content: bytes, chunk: int, **fields: Any
) -> list[Packet]:
    pieces = [content[i : i + chunk] for i in range(0, len(content), chunk)]
    return [
        Packet(kind, file_id, seq, len(pieces), piece, **fields)
        for seq, piece in enumerate(pieces, start=1)
    ]


def seed(data_dir: Path, catalog_url: str, blob_url: str | None = None) -> Seeded:
    """Store an image, two texts (one in the catalog, one as a blob), a failed
    image and a half-received video, in that order, a moment apart."""
    settings = Settings.load(
        data_dir=data_dir,
        catalog_url=catalog_url,
        blob_url=blob_url,
        **TEXT_LIMITS,
    )
    catalog = Catalog.open(settings.catalog_url)
    assembler = Assembler(
        settings,
        catalog,
        open_store(settings.staging_url),
        open_store(settings.blob_url),
        owner="test-seed",
    )
    seeded = Seeded(data_dir, settings.catalog_url, settings.blob_url)

    def store(
        file_id: str, kind: str, content: bytes, chunk: int, **fields: Any
    ) -> None:
        assembler.stage(packets_of(file_id, kind, content, chunk, **fields))
        # Staging may already have stored a small text; finalize then does nothing.
        assembler.finalize(file_id)
        record = catalog.get(file_id)
        assert record is not None
        assert record.state in ("stored", "failed"), record
        seeded.contents[file_id] = content
        seeded.order.append(file_id)
        time.sleep(0.02)

    store(
        "photo",
        "image",
        os.urandom(312_345),
        100_000,
        file_name="photo one.png",
        device_id="robot-1",
    )
    store("notes", "text", TEXT, 700, file_name="notes.txt", device_id="robot-2")
    seeded.middle = time.time()
    time.sleep(0.02)
    store(
        "biglog",
        "text",
        b"line of a long log\n" * 400,
        3000,
        file_name="big.log",
        device_id="robot-2",
    )
    store(
        "broken",
        "image",
        b"x" * 5000,
        1000,
        file_name="b.jpg",
        device_id="robot-3",
        file_sha256="0" * 64,
    )

    video = packets_of(
        "drive",
        "video",
        os.urandom(10 * 4000),
        4000,
        file_name="drive.mp4",
        device_id="robot-1",
    )
    assembler.stage([video[0], video[1], video[5]])
    seeded.order.append("drive")
    catalog.close()
    return seeded


def _pg_admin(statement: sql.Composed) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(statement)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    """A catalog of each kind, seeded once for this module's read-only tests."""
    data_dir = tmp_path_factory.mktemp(f"center-{request.param}")
    if request.param == "sqlite":
        yield seed(data_dir, f"sqlite:///{data_dir / 'catalog.db'}")
        return

    request.getfixturevalue("postgres")
    name = f"datahaul_center_{secrets.token_hex(4)}"
    _pg_admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield seed(data_dir, PG_SERVER_URL + name)
    finally:
        _pg_admin(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


@pytest.fixture
async def client(seeded: Seeded, amqp_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    """The center app over the seeded catalog, on a real port, with its broker."""
    settings = Settings.load(
        data_dir=seeded.data_dir,
        catalog_url=seeded.catalog_url,
        blob_url=seeded.blob_url,
        amqp_url=amqp_url,
    )
    async with TestClient(TestServer(create_app(settings))) as test_client:
        yield test_client


async def get_json(client: TestClient[Any, Any], path: str) -> tuple[int, Any]:
    async with client.get(path) as response:
        return response.status, await response.json()


async def test_files_are_listed_newest_first(client, seeded: Seeded) -> None:
    """Without filters every file is listed, newest first, with links."""
    status, body = await get_json(client, "/v1/files")

    assert status == 200
    assert [f["file_id"] for f in body["files"]] == list(reversed(seeded.order))
    assert body["next"] is None
    photo = next(f for f in body["files"] if f["file_id"] == "photo")
    assert photo["links"]["content"] == "/v1/files/photo/content"
    assert photo["created_at"].endswith("Z")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("type=text", {"notes", "biglog"}),
        ("type=image&state=failed", {"broken"}),
        ("state=receiving", {"drive"}),
        ("device=robot-1", {"photo", "drive"}),
        ("device=robot-2&type=image", set()),
    ],
)
async def test_files_are_filtered(client, query: str, expected: set[str]) -> None:
    """Type, state and device filters combine."""
    status, body = await get_json(client, f"/v1/files?{query}")

    assert status == 200
    assert {f["file_id"] for f in body["files"]} == expected


async def test_time_filters_take_iso_8601_and_epoch_seconds(client, seeded) -> None:
    """since and until split the files at a moment given either way."""
    moment = datetime.datetime.fromtimestamp(seeded.middle, datetime.UTC)
    iso = moment.isoformat().replace("+00:00", "Z")

    _, after = await get_json(client, f"/v1/files?since={iso}")
    _, before = await get_json(client, f"/v1/files?until={seeded.middle}")

    assert {f["file_id"] for f in after["files"]} == {"biglog", "broken", "drive"}
    assert {f["file_id"] for f in before["files"]} == {"photo", "notes"}


async def test_pages_follow_next_links_to_the_end(client, seeded: Seeded) -> None:
    """limit pages the list; following `next` visits each file exactly once."""
    seen: list[str] = []
    path: str | None = "/v1/files?limit=2"
    pages = 0
    while path is not None:
        status, body = await get_json(client, path)
        assert status == 200
        assert len(body["files"]) <= 2
        seen += [f["file_id"] for f in body["files"]]
        path = body["next"]
        pages += 1

    assert seen == list(reversed(seeded.order))
    assert pages == 3


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("type=audio", "type"),
        ("state=lost", "state"),
        ("since=yesterday", "since"),
        ("until=2024-13-45", "until"),
        ("since=2030-01-01T00:00:00Z&until=2020-01-01T00:00:00Z", "until"),
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("devcie=robot-1", "devcie"),
    ],
)
async def test_bad_filters_are_refused_naming_the_parameter(
    client, query: str, field: str
) -> None:
    """A bad filter value gets 400 with JSON that names the parameter and why."""
    status, body = await get_json(client, f"/v1/files?{query}")

    assert status == 400
    assert body["field"] == field
    assert body["error"] == "BadParameter"
    assert body["reason"]


async def test_a_stored_file_shows_size_sha256_and_location(client, seeded) -> None:
    """The detail of a stored file carries its size, SHA-256 and where it is."""
    status, body = await get_json(client, "/v1/files/photo")

    content = seeded.contents["photo"]
    assert status == 200
    assert body["state"] == "stored"
    assert body["size"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["location"].startswith(seeded.blob_url.split("?")[0].rstrip("/"))
    assert body["packets"] == {"received": 4, "total": 4}
    assert body["missing"] == []


async def test_an_incomplete_file_shows_progress_and_missing_ranges(client) -> None:
    """A receiving file shows packets received of total and the seqs it lacks."""
    status, body = await get_json(client, "/v1/files/drive")

    assert status == 200
    assert body["state"] == "receiving"
    assert body["packets"] == {"received": 3, "total": 10}
    assert body["missing"] == [[3, 5], [7, 10]]
    assert "content" not in body["links"]


@pytest.mark.parametrize("suffix", ["", "/content", "/text"])
async def test_an_unknown_file_is_404_naming_it(client, suffix: str) -> None:
    """Asking for a file the catalog lacks gets 404 naming the file id."""
    status, body = await get_json(client, f"/v1/files/no-such-file{suffix}")

    assert status == 404
    assert body["field"] == "file_id"
    assert "no-such-file" in body["reason"]


async def test_content_downloads_whole_with_type_name_and_etag(client, seeded) -> None:
    """The whole content comes back byte for byte, typed and named."""
    async with client.get("/v1/files/photo/content") as response:
        body = await response.read()
        headers = response.headers

    content = seeded.contents["photo"]
    assert response.status == 200
    assert body == content
    assert headers["Content-Type"] == "image/png"
    assert headers["Content-Length"] == str(len(content))
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"] == f'"{hashlib.sha256(content).hexdigest()}"'
    assert 'filename="photo one.png"' in headers["Content-Disposition"]
    assert "filename*=UTF-8''photo%20one.png" in headers["Content-Disposition"]


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=100000-100009", 100_000, 100_010),
        ("bytes=312000-", 312_000, 312_345),
        ("bytes=-45", 312_300, 312_345),
        ("bytes=312340-999999", 312_340, 312_345),
        ("bytes=7-7", 7, 8),
    ],
)
async def test_a_range_gets_206_with_exactly_those_bytes(
    client, seeded, header: str, start: int, end: int
) -> None:
    """A satisfiable Range gets 206, the bytes asked for and a Content-Range."""
    async with client.get("/v1/files/photo/content", headers={"Range": header}) as r:
        body = await r.read()

    assert r.status == 206
    assert body == seeded.contents["photo"][start:end]
    assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/312345"
    assert r.headers["Content-Length"] == str(end - start)


@pytest.mark.parametrize("header", ["bytes=312345-", "bytes=400000-400010", "bytes=-0"])
async def test_a_range_past_the_end_is_416(client, header: str) -> None:
    """A range wholly outside the file gets 416 and the file's size."""
    async with client.get("/v1/files/photo/content", headers={"Range": header}) as r:
        body = await r.json()

    assert r.status == 416
    assert r.headers["Content-Range"] == "bytes */312345"
    assert body["field"] == "Range"


@pytest.mark.parametrize(
    "headers",
    [
        {"Range": "bytes=0-1,5-9"},
        {"Range": "pages=1-2"},
        {"Range": "bytes=9-3"},
        {"Range": "bytes=0-9", "If-Range": '"another-version"'},
    ],
)
async def test_ranges_this_server_does_not_serve_get_the_whole_file(
    client, seeded, headers: dict[str, str]
) -> None:
    """Several ranges, another unit, a reversed range or a stale If-Range get 200."""
    async with client.get("/v1/files/photo/content", headers=headers) as r:
        body = await r.read()

    assert r.status == 200
    assert body == seeded.contents["photo"]


async def test_if_range_with_the_current_etag_gets_the_range(client, seeded) -> None:
    """A resumed download of the same version gets just the rest."""
    tag = f'"{hashlib.sha256(seeded.contents["photo"]).hexdigest()}"'
    headers = {"Range": "bytes=300000-", "If-Range": tag}
    async with client.get("/v1/files/photo/content", headers=headers) as r:
        body = await r.read()

    assert r.status == 206
    assert body == seeded.contents["photo"][300_000:]


@pytest.mark.parametrize("file_id", ["notes", "biglog"])
async def test_text_comes_as_utf8_text_from_wherever_it_is_stored(
    client, seeded, file_id: str
) -> None:
    """A text file reads as text/plain; charset=utf-8, from the catalog or a blob."""
    _, detail = await get_json(client, f"/v1/files/{file_id}")
    async with client.get(f"/v1/files/{file_id}/text") as response:
        text = await response.text()

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert text == seeded.contents[file_id].decode("utf-8")
    expected_place = "catalog:texts/" if file_id == "notes" else "file://"
    assert detail["location"].startswith(expected_place)


async def test_text_ranges_count_bytes(client, seeded) -> None:
    """A range of a text file is a byte range, as HTTP has it."""
    async with client.get("/v1/files/notes/text", headers={"Range": "bytes=0-4"}) as r:
        body = await r.read()

    assert r.status == 206
    assert body == seeded.contents["notes"][:5]


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/v1/files/drive/content", "NotStored"),
        ("/v1/files/broken/content", "NotStored"),
        ("/v1/files/photo/text", "NotText"),
    ],
)
async def test_content_that_cannot_be_served_is_409_saying_why(
    client, path: str, error: str
) -> None:
    """An unfinished or failed file has no content yet; an image has no text."""
    status, body = await get_json(client, path)

    assert status == 409
    assert body["error"] == error
    assert body["field"] == "file_id"


async def test_head_gives_the_headers_without_the_body(client, seeded) -> None:
    """HEAD on content tells the size and type without sending the bytes."""
    async with client.head("/v1/files/photo/content") as response:
        body = await response.read()

    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(seeded.contents["photo"]))
    assert body == b""


def _example_path(template: str) -> str:
    return template.replace("{file_id}", "notes")


async def test_openapi_describes_every_route_and_every_path_answers(client) -> None:
    """Each route is in /openapi.json and each described path answers as listed."""
    status, document = await get_json(client, "/openapi.json")
    assert status == 200
    assert document["openapi"].startswith("3.")

    routes = {
        resource.canonical
        for resource in client.server.app.router.resources()
        if not resource.canonical.startswith("/static")
    }
    assert routes == set(document["paths"])

    for template, operations in document["paths"].items():
        for method, operation in operations.items():
            async with client.request(method.upper(), _example_path(template)) as r:
                await r.read()
            assert str(r.status) in operation["responses"], (template, r.status)


async def test_openapi_error_statuses_are_listed(client) -> None:
    """The error statuses the handlers give are the ones the description lists."""
    _, document = await get_json(client, "/openapi.json")

    paths = document["paths"]
    assert "400" in paths["/v1/files"]["get"]["responses"]
    for template in ("/v1/files/{file_id}/content", "/v1/files/{file_id}/text"):
        listed = paths[template]["get"]["responses"]
        assert {"200", "206", "404", "409", "416"} <= set(listed)


async def wait_for(
    client: TestClient[Any, Any], check: Any, within: float = 20.0
) -> Any:
    deadline = time.monotonic() + within
    while True:
        _, live = await get_json(client, "/v1/live")
        if check(live):
            return live
        assert time.monotonic() < deadline, f"live feed never matched: {live}"
        await asyncio.sleep(0.2)


async def declare_topology(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await topology.declare(await connection.channel(), Settings.load())


async def test_the_live_feed_shows_transfers_stored_files_and_queues(
    client, seeded, amqp_url: str
) -> None:
    """/v1/live shows the file in flight, the stored ones, throughput and queues."""
    await declare_topology(amqp_url)

    live = await wait_for(
        client, lambda s: s["broker"]["up"] and s["queues"][0]["state"] == "ok"
    )

    assert [f["file_id"] for f in live["in_flight"]] == ["drive"]
    assert live["in_flight"][0]["received"] == 3
    assert live["in_flight"][0]["total_seq"] == 10
    assert {f["file_id"] for f in live["recent"]} == {
        "photo",
        "notes",
        "biglog",
        "broken",
    }
    stored = ("photo", "notes", "biglog")
    expected_bytes = sum(len(seeded.contents[name]) for name in stored)
    assert live["throughput"]["bytes"] == expected_bytes
    assert sum(live["throughput"]["series"]) == expected_bytes
    assert live["states"] == {"stored": 3, "failed": 1, "receiving": 1}
    assert {q["queue"]: (q["messages"], q["consumers"]) for q in live["queues"]} == {
        "text_data_queue": (0, 0),
        "image_data_queue": (0, 0),
        "video_data_queue": (0, 0),
        "datahaul_dead_letter_queue": (0, 0),
    }
    assert live["dead_letters"] == 0


async def test_queue_depths_count_waiting_and_dead_lettered_messages(
    client, amqp_url: str
) -> None:
    """Messages waiting in a queue and in the dead-letter queue are counted."""
    await declare_topology(amqp_url)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in ("image_data_queue", topology.DEAD_QUEUE, topology.DEAD_QUEUE):
            await channel.default_exchange.publish(aio_pika.Message(b"x"), queue)

        live = await wait_for(client, lambda s: s["dead_letters"] == 2)

    depths = {q["queue"]: q["messages"] for q in live["queues"]}
    assert depths["image_data_queue"] == 1
    assert depths[topology.DEAD_QUEUE] == 2


async def test_a_missing_queue_is_shown_as_missing(client, amqp_url: str) -> None:
    """Before anyone declared the topology, the queues show as missing."""
    live = await wait_for(client, lambda s: s["broker"]["up"])

    assert {q["state"] for q in live["queues"]} == {"missing"}
    assert live["dead_letters"] is None


async def test_a_gateway_report_reaches_the_live_feed(client, amqp_url: str) -> None:
    """A status report published through RabbitMQ shows as that gateway's row."""
    settings = Settings.load(amqp_url=amqp_url)
    health = {
        "status": "degraded",
        "broker": "down",
        "broker_error": "connection refused",
        "outbox": {"packets": 12, "bytes": 34_000, "quota_bytes": 1_000_000},
    }
    await wait_for(client, lambda s: s["broker"]["up"])
    reporter = StatusReporter(settings, "test-gw:1", lambda: health, interval=0.2)
    task = asyncio.create_task(reporter.run())
    try:
        live = await wait_for(client, lambda s: bool(s["gateways"]))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    (gateway,) = live["gateways"]
    assert gateway["gateway_id"] == "test-gw:1"
    assert gateway["link"] == "down"
    assert gateway["outbox_packets"] == 12
    assert gateway["outbox_bytes"] == 34_000
    assert gateway["stale"] is False


async def test_a_center_stopped_while_it_connects_leaves_no_connection_open(
    tmp_path: Path, amqp_url: str
) -> None:
    """Stopping lands at every point of the broker handshake in turn; none
    leaves a connection running for whoever closes the loop to tear down."""
    settings = Settings.load(data_dir=tmp_path, amqp_url=amqp_url)
    left_running: list[str] = []
    for attempt in range(300):
        async with TestClient(TestServer(create_app(settings))):
            await asyncio.sleep((attempt % 50) * 0.0002)
        await asyncio.sleep(0.02)

        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        left_running += [repr(t.get_coro()) for t in leftovers]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    assert left_running == []


def test_reports_turn_stale_then_are_forgotten() -> None:
    """A gateway that stops reporting is marked stale, and later dropped."""
    now = [1000.0]
    book = ReportBook(stale_after=6.5, forget_after=60.0, clock=lambda: now[0])
    assert book.take(b'{"gateway_id": "a", "broker": "up", "outbox": {"bytes": 5}}')
    assert book.take(b"not json") is None
    assert book.take(b'{"no_id": 1}') is None

    now[0] += 5
    (fresh,) = book.gateways()
    now[0] += 5
    (stale,) = book.gateways()
    now[0] += 60
    forgotten = book.gateways()

    assert (fresh["link"], fresh["stale"], fresh["outbox_bytes"]) == ("up", False, 5)
    assert (stale["link"], stale["stale"]) == ("stale", True)
    assert forgotten == []
    assert book.rejected == 2


@pytest.fixture(scope="module")
def s3_seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Seeded, str]]:
    """The seed again, with images and blob texts in a real S3-protocol server."""
    with S3Server() as server:
        bucket = server.create_bucket()
        url = server.store_url(bucket, "center")
        data_dir = tmp_path_factory.mktemp("center-s3")
        yield seed(data_dir, f"sqlite:///{data_dir / 'catalog.db'}", url), url


async def test_content_is_downloaded_from_an_s3_store(s3_seeded, amqp_url) -> None:
    """A file in S3 downloads whole and by range, just as one on disk does."""
    seeded, url = s3_seeded
    settings = Settings.load(
        data_dir=seeded.data_dir,
        catalog_url=seeded.catalog_url,
        blob_url=url,
        amqp_url=amqp_url,
    )
    async with TestClient(TestServer(create_app(settings))) as s3_client:
        _, detail = await get_json(s3_client, "/v1/files/photo")
        async with s3_client.get("/v1/files/photo/content") as whole:
            body = await whole.read()
        ranged = {"Range": "bytes=99990-100009"}
        async with s3_client.get("/v1/files/photo/content", headers=ranged) as part:
            piece = await part.read()
        async with s3_client.get("/v1/files/biglog/text") as text:
            log_text = await text.read()

    content = seeded.contents["photo"]
    assert detail["location"].startswith("s3://")
    assert (whole.status, body) == (200, content)
    assert (part.status, piece) == (206, content[99_990:100_010])
    assert (text.status, log_text) == (200, seeded.contents["biglog"])


async def test_content_under_another_store_is_refused_naming_the_setting(
    s3_seeded, amqp_url
) -> None:
    """A center pointed at the wrong store says where the file is and what to set."""
    seeded, _ = s3_seeded
    settings = Settings.load(
        data_dir=seeded.data_dir, catalog_url=seeded.catalog_url, amqp_url=amqp_url
    )
    async with TestClient(TestServer(create_app(settings))) as wrong_client:
        status, body = await get_json(wrong_client, "/v1/files/photo/content")

    assert status == 503
    assert body["field"] == "location"
    assert "DATAHAUL_BLOB_URL" in body["reason"]
