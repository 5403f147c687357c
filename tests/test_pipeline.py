"""The pipeline end to end: gateway, real RabbitMQ, worker processes, storage."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random

import aio_pika
import pytest
import xxhash

from datahaul.sender import Sender
from pipeline_helpers import (
    SourceFile,
    call,
    file_rows,
    post_packets,
    staged_leftovers,
    stored_bytes,
    wait_stored,
)


@pytest.fixture
def gateway_url(datahaul_env):
    """Where this test's gateway listens."""
    return datahaul_env["DATAHAUL_GATEWAY_URL"]


def _files(count: int, seed: int) -> list[SourceFile]:
    rng = random.Random(seed)
    kinds = ["text", "image", "video"]
    files = []
    for index in range(count):
        kind = kinds[index % 3]
        size = rng.randint(1, 300_000)
        content = (
            "".join(rng.choice("abcdef \n") for _ in range(size)).encode()
            if kind == "text"
            else rng.randbytes(size)
        )
        files.append(
            SourceFile(
                f"{kind}-{seed}-{index}",
                kind,
                content,
                chunk=rng.choice([1000, 4096, 70_000]),
            )
        )
    return files


def test_shuffled_duplicated_interleaved_packets_assemble_exactly_once(
    gateway_url, gateway, worker_factory, datahaul_env, data_dir
):
    """Packets of many files, shuffled together and partly sent twice, come out
    as each file once, byte-identical, with nothing left staged."""
    worker_factory("all")
    base = gateway_url
    files = _files(9, seed=7)
    packets = [p for f in files for p in f.packets()]
    packets += random.Random(1).sample(packets, len(packets) // 3)
    random.Random(2).shuffle(packets)

    for start in range(0, len(packets), 17):
        status, answer = post_packets(base, packets[start : start + 17])
        assert status == 200, answer

    catalog_url = datahaul_env["DATAHAUL_CATALOG_URL"]
    records = wait_stored(catalog_url, [f.file_id for f in files])
    for source in files:
        record = records[source.file_id]
        assert record.state == "stored"
        assert record.sha256 == source.sha256
        assert stored_bytes(catalog_url, record) == source.content
        assert file_rows(catalog_url, source.file_id) == 1
    assert staged_leftovers(catalog_url, str(data_dir)) == (0, [])


def test_raw_chunk_upload_and_ndjson_assemble_one_file(
    gateway_url, gateway, worker_factory, datahaul_env
):
    """A file sent half as raw PUT chunks and half as NDJSON is stored whole."""
    worker_factory("image")
    source = SourceFile("mixed-forms", "image", os.urandom(50_000), chunk=10_000)
    for seq in (1, 3, 5):
        data = source.content[(seq - 1) * 10_000 : seq * 10_000]
        status, answer = call(
            f"{gateway_url}/v1/files/{source.file_id}/chunks/{seq}",
            data,
            method="PUT",
            headers={
                "X-Datahaul-Type": "image",
                "X-Datahaul-Total-Seq": "5",
                "X-Datahaul-File-Name": "mixed.png",
            },
        )
        assert status == 200, answer
    lines = "\n".join(json.dumps(source.packet(seq)) for seq in (2, 4))
    status, answer = call(
        f"{gateway_url}/v1/packets",
        lines.encode(),
        method="POST",
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 200, answer

    catalog_url = datahaul_env["DATAHAUL_CATALOG_URL"]
    record = wait_stored(catalog_url, [source.file_id])[source.file_id]
    assert stored_bytes(catalog_url, record) == source.content
    assert record.file_name == "mixed.png"


def test_two_worker_processes_share_a_queue(
    gateway_url, gateway, worker_factory, datahaul_env
):
    """Two workers consuming one queue store every file exactly once, and both
    take part."""
    first = worker_factory("video")
    second = worker_factory("video")
    files = [
        SourceFile(f"shared-{i}", "video", os.urandom(400_000), chunk=20_000)
        for i in range(8)
    ]
    packets = [p for f in files for p in f.packets()]
    random.Random(3).shuffle(packets)
    for start in range(0, len(packets), 5):
        status, answer = post_packets(gateway_url, packets[start : start + 5])
        assert status == 200, answer

    catalog_url = datahaul_env["DATAHAUL_CATALOG_URL"]
    records = wait_stored(catalog_url, [f.file_id for f in files])
    for source in files:
        assert records[source.file_id].sha256 == source.sha256
        assert file_rows(catalog_url, source.file_id) == 1
    assert "file.stored" in first.log_tail(100_000) or "file.stored" in second.log_tail(
        100_000
    )
    assert "worker.consuming" in first.log_tail(100_000)
    assert "worker.consuming" in second.log_tail(100_000)


async def test_design_note_json_published_straight_to_a_queue(
    worker_factory, datahaul_env, amqp_url
):
    """Another program's JSON body without `type`, published to image_data_queue,
    is assembled like any other packet."""
    worker_factory("image")
    content = os.urandom(30_000)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for seq in (3, 1, 2):
            body = {
                "file_id": "note-json",
                "seq": seq,
                "total_seq": 3,
                "data": base64.b64encode(
                    content[(seq - 1) * 10_000 : seq * 10_000]
                ).decode(),
            }
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="image_data_queue",
            )

    catalog_url = datahaul_env["DATAHAUL_CATALOG_URL"]
    record = await asyncio.to_thread(wait_stored, catalog_url, ["note-json"])
    assert record["note-json"].type == "image"
    assert record["note-json"].sha256 == hashlib.sha256(content).hexdigest()


@pytest.mark.slow
async def test_a_200_mb_video_is_byte_identical_after_the_trip(
    gateway_url, gateway, worker_factory, datahaul_env, tmp_path
):
    """A 210 MB video sent with the sender, asked for its SHA-256 too, comes
    out byte-identical and checked against both digests."""
    worker_factory("video")
    path = tmp_path / "drive.mp4"
    digest, xxh128 = hashlib.sha256(), xxhash.xxh3_128()
    with open(path, "wb") as handle:
        for _ in range(210):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            xxh128.update(block)
            handle.write(block)

    async with Sender(gateway_url, concurrency=8, sha256=True) as sender:
        result = await sender.send_file(path, chunk_size="1M")
    assert result.type == "video"
    assert (result.sha256, result.xxh128) == (digest.hexdigest(), xxh128.hexdigest())

    catalog_url = datahaul_env["DATAHAUL_CATALOG_URL"]
    records = await asyncio.to_thread(wait_stored, catalog_url, [result.file_id], 180.0)
    record = records[result.file_id]
    assert record.sha256 == digest.hexdigest()
    assert (record.expected_sha256, record.expected_xxh128) == (
        digest.hexdigest(),
        xxh128.hexdigest(),
    )
    assert record.size == 210 * 1024 * 1024
    stored = record.location.removeprefix("file://")
    check = hashlib.sha256()
    with open(stored, "rb") as handle:
        while block := handle.read(1 << 20):
            check.update(block)
    assert check.hexdigest() == digest.hexdigest()


def test_postgresql_catalog_stores_text_and_images(
    gateway_url, gateway_factory, worker_factory, datahaul_env, datahaul_pg_env
):
    """With the catalog in PostgreSQL, text lands in its table and images in
    the blob store, each with one catalog row."""
    gateway_factory(env=datahaul_pg_env)
    worker_factory("all", env=datahaul_pg_env)
    text = SourceFile("pg-text", "text", b"line one\nline two\n" * 500, chunk=4000)
    image = SourceFile("pg-image", "image", os.urandom(90_000), chunk=30_000)
    status, answer = post_packets(gateway_url, text.packets() + image.packets())
    assert status == 200, answer

    catalog_url = datahaul_pg_env["DATAHAUL_CATALOG_URL"]
    records = wait_stored(catalog_url, ["pg-text", "pg-image"])
    assert stored_bytes(catalog_url, records["pg-text"]) == text.content
    assert stored_bytes(catalog_url, records["pg-image"]) == image.content
    assert file_rows(catalog_url, "pg-text") == 1


def test_empty_files_are_stored_empty(
    gateway_url, gateway, worker_factory, datahaul_env
):
    """A zero-byte file (one empty packet) is stored as an empty file."""
    worker_factory("all")
    empties = [
        SourceFile(f"empty-{kind}", kind, b"", chunk=1000) for kind in ("text", "image")
    ]
    status, answer = post_packets(gateway_url, [f.packet(1) for f in empties])
    assert status == 200, answer

    catalog_url = datahaul_env["DATAHAUL_CATALOG_URL"]
    records = wait_stored(catalog_url, [f.file_id for f in empties])
    for source in empties:
        assert records[source.file_id].state == "stored"
        assert records[source.file_id].size == 0
        assert stored_bytes(catalog_url, records[source.file_id]) == b""
