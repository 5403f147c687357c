"""Nothing lost, nothing doubled, nothing corrupted: the pipeline under faults.

Every test sends several files of mixed types and sizes, injects a fault,
and ends with the same check: each file stored exactly once with its
source's SHA-256, no staged data left, and the gateway's outbox empty.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from datahaul.faults.rabbit import rabbitmq_down
from datahaul.protocol.wire import JSON_CONTENT_TYPE
from datahaul.sender import Sender, SendResult
from datahaul.storage.catalog import Catalog
from pipeline_helpers import (
    SourceFile,
    call,
    file_rows,
    post_packets,
    staged_leftovers,
    stored_bytes,
    wait_stored,
)

# Workers in these tests give up a dead finalizer's lease and sweep quickly.
FAST_RECOVERY = {
    "DATAHAUL_LEASE_SECONDS": "3",
    "DATAHAUL_SWEEP_INTERVAL": "0.5",
}

KINDS = {"text": ".log", "image": ".png", "video": ".mp4"}


def _write_files(folder: Path, count: int, seed: int, largest: int) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        kind = list(KINDS)[index % 3]
        size = rng.randint(1, largest)
        path = folder / f"{kind}-{seed}-{index}{KINDS[kind]}"
        if kind == "text":
            path.write_bytes(
                b"".join(
                    rng.choice([b"ok ", b"warn ", b"\n"]) for _ in range(size // 3 + 1)
                )
            )
        else:
            path.write_bytes(rng.randbytes(size))
        paths.append(path)
    return paths


async def _send(url: str, paths: list[Path], chunk: str = "64K") -> list[SendResult]:
    async with Sender(url, concurrency=4) as sender:
        results = await sender.send_files(paths, chunk_size=chunk)
    for result in results:
        assert isinstance(result, SendResult), result
    return results  # type: ignore[return-value]


async def _outbox_empty(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status, health = await asyncio.to_thread(call, f"{url}/healthz")
        if status == 200 and health["outbox"]["packets"] == 0:
            return
        assert time.monotonic() < deadline, f"outbox never drained: {health}"
        await asyncio.sleep(0.2)


def _sent(results: list[SendResult]) -> list[tuple[str, str]]:
    """Each sent file's id and the SHA-256 of its source on disk: the truth
    the stored copy is judged against, not what the sender said."""
    return [
        (r.file_id, hashlib.sha256(Path(r.source).read_bytes()).hexdigest())
        for r in results
    ]


async def _all_stored_once(
    env: dict[str, str],
    data_dir: Path,
    sent: list[tuple[str, str]],
    timeout: float = 120.0,
) -> None:
    """Every (file_id, sha256) stored once, byte-identical; nothing left over."""
    catalog_url = env["DATAHAUL_CATALOG_URL"]
    records = await asyncio.to_thread(
        wait_stored, catalog_url, [f for f, _ in sent], timeout
    )
    for file_id, sha256 in sent:
        record = records[file_id]
        assert record.state == "stored", record
        assert record.sha256 == sha256
        content = stored_bytes(catalog_url, record)
        assert hashlib.sha256(content).hexdigest() == sha256
        assert file_rows(catalog_url, file_id) == 1
    assert await asyncio.to_thread(staged_leftovers, catalog_url, str(data_dir)) == (
        0,
        [],
    )
    await _outbox_empty(env["DATAHAUL_GATEWAY_URL"])


@pytest.mark.broker_outage
async def test_broker_stopped_mid_transfer_while_sending_goes_on(
    gateway, worker_factory, datahaul_env, data_dir, tmp_path
):
    """With RabbitMQ stopped in the middle of the transfers, the gateway keeps
    accepting into its outbox, and once RabbitMQ is back every file is stored."""
    worker_factory("all", env=FAST_RECOVERY)
    url = datahaul_env["DATAHAUL_GATEWAY_URL"]
    before = _write_files(tmp_path, 6, seed=11, largest=400_000)
    during = _write_files(tmp_path, 6, seed=12, largest=400_000)

    results = await _send(url, before)
    async with rabbitmq_down():
        results += await _send(url, during)
        _, health = await asyncio.to_thread(call, f"{url}/healthz")
        assert health["broker"] == "down"
        assert health["outbox"]["packets"] > 0
    await _all_stored_once(datahaul_env, data_dir, _sent(results))


async def test_worker_killed_in_the_middle_of_a_file(
    gateway, worker_factory, datahaul_env, data_dir
):
    """A worker killed with kill -9 halfway through a file loses and doubles
    nothing: another worker finishes the file from the staged packets."""
    first = worker_factory("video", env=FAST_RECOVERY)
    url = datahaul_env["DATAHAUL_GATEWAY_URL"]
    video = SourceFile("killed-mid-file", "video", os.urandom(2_000_000), chunk=100_000)
    others = [
        SourceFile(f"bystander-{i}", "video", os.urandom(150_000), chunk=70_000)
        for i in range(3)
    ]
    packets = video.packets()

    status, _ = post_packets(url, packets[:10] + others[0].packets())
    assert status == 200
    await _wait_chunks(datahaul_env, video.file_id, 10)
    first.kill9()

    status, _ = post_packets(
        url, packets[5:] + others[1].packets() + others[2].packets()
    )
    assert status == 200
    worker_factory("video", env=FAST_RECOVERY)
    await _all_stored_once(
        datahaul_env, data_dir, [(f.file_id, f.sha256) for f in [video, *others]]
    )


async def test_worker_killed_during_the_final_store(
    gateway, worker_factory, datahaul_env, data_dir
):
    """A worker killed while storing a file leaves it half done; another worker
    takes it over when the lease runs out and stores it exactly once.

    The first chunk is shorter than the others, so the file cannot be laid
    out in place while it is staged: its store copies every byte, which
    takes long enough to be killed in. (A store by linking the staged image
    is one rename; its redo is in tests/test_assembler.py.)
    """
    first = worker_factory("video", env=FAST_RECOVERY)
    url = datahaul_env["DATAHAUL_GATEWAY_URL"]
    video = SourceFile(
        "killed-in-store", "video", os.urandom(120 * 1024 * 1024), chunk=1024 * 1024
    )

    packets = uneven_packets(video, first_chunk=512 * 1024)
    for start in range(0, len(packets), 8):
        status, answer = post_packets(url, packets[start : start + 8])
        assert status == 200, answer
    await _wait_state(datahaul_env, video.file_id, "assembling")
    first.kill9()

    catalog = Catalog.open(datahaul_env["DATAHAUL_CATALOG_URL"])
    assert catalog.get(video.file_id).state == "assembling"  # type: ignore[union-attr]
    catalog.close()
    worker_factory("video", env=FAST_RECOVERY)
    await _all_stored_once(datahaul_env, data_dir, [(video.file_id, video.sha256)])


def uneven_packets(source: SourceFile, first_chunk: int) -> list[dict[str, Any]]:
    """The file's packets with a first chunk of its own size, the rest even."""
    content, chunk = source.content, source.chunk
    starts = range(first_chunk, len(content), chunk)
    pieces = [content[:first_chunk], *(content[i : i + chunk] for i in starts)]
    return [
        {
            "type": source.type,
            "file_id": source.file_id,
            "seq": seq,
            "total_seq": len(pieces),
            "data": base64.b64encode(piece).decode(),
            "chunk_sha256": hashlib.sha256(piece).hexdigest(),
            "file_sha256": source.sha256,
        }
        for seq, piece in enumerate(pieces, start=1)
    ]


async def test_gateway_killed_with_a_full_outbox_then_restarted(
    gateway_factory, worker_factory, datahaul_env, data_dir, fault_proxy, tmp_path
):
    """Packets buffered in the outbox survive kill -9 of the gateway and are
    forwarded after it restarts."""
    worker_factory("all", env=FAST_RECOVERY)
    fault_proxy.refuse(cut_open=True)
    gateway = gateway_factory(proxy=fault_proxy, healthy_only=False)
    url = datahaul_env["DATAHAUL_GATEWAY_URL"]

    results = await _send(url, _write_files(tmp_path, 6, seed=21, largest=300_000))
    assert sum(r.packets_buffered for r in results) > 0
    _, health = await asyncio.to_thread(call, f"{url}/healthz")
    assert health["outbox"]["packets"] == sum(r.packets_sent for r in results)

    gateway.kill9()
    fault_proxy.pass_through()
    gateway.restart()
    await _all_stored_once(datahaul_env, data_dir, _sent(results))


@pytest.mark.parametrize("fault", ["stall", "cut"])
async def test_broker_connection_stalled_or_cut_through_the_proxy(
    fault,
    gateway_factory,
    worker_factory,
    datahaul_env,
    data_dir,
    fault_proxy,
    tmp_path,
):
    """A link whose confirms stop coming back, or that is cut, costs nothing:
    the gateway buffers what was unconfirmed and forwards it later."""
    worker_factory("all", env=FAST_RECOVERY)
    gateway_factory(proxy=fault_proxy)
    url = datahaul_env["DATAHAUL_GATEWAY_URL"]
    files = _write_files(tmp_path, 9, seed=31, largest=500_000)

    sending = asyncio.create_task(_send(url, files, chunk="32K"))
    await asyncio.sleep(0.3)
    if fault == "stall":
        fault_proxy.stall()
        await asyncio.sleep(8)
    else:
        fault_proxy.cut()
    fault_proxy.pass_through()
    results = await sending
    await _all_stored_once(datahaul_env, data_dir, _sent(results))


async def test_poison_packets_go_to_the_dead_letter_queue_and_others_flow(
    gateway, worker_factory, datahaul_env, data_dir, amqp_url
):
    """Undecodable, corrupted and conflicting packets are dead-lettered with
    their reason; duplicated and reordered ones are absorbed; good files flow."""
    worker_factory("all", env=FAST_RECOVERY)
    url = datahaul_env["DATAHAUL_GATEWAY_URL"]
    good = SourceFile("good-neighbour", "image", os.urandom(200_000), chunk=30_000)
    packets = good.packets()
    random.Random(5).shuffle(packets)
    status, _ = post_packets(url, packets + packets[:3])
    assert status == 200

    corrupted = good.packet(1) | {"file_id": "corrupted", "total_seq": 7}
    corrupted["chunk_sha256"] = "0" * 64
    scrambled = good.packet(3) | {"file_id": "scrambled", "total_seq": 7}
    scrambled.pop("chunk_sha256")
    scrambled["chunk_xxh128"] = "0" * 32
    conflicting = good.packet(2) | {"total_seq": 99}
    conflicting.pop("chunk_sha256")
    poison = [
        b"\x00not json at all",
        json.dumps(corrupted).encode(),
        json.dumps(scrambled).encode(),
        json.dumps(conflicting).encode(),
    ]
    reasons = await _publish_and_collect_dead(amqp_url, poison)

    assert len(reasons) == 4
    assert any("neither a datahaul packet" in r for r in reasons)
    assert any("chunk_sha256" in r for r in reasons)
    assert any("chunk_xxh128" in r for r in reasons)
    assert any("total_seq" in r for r in reasons)
    await _all_stored_once(datahaul_env, data_dir, [(good.file_id, good.sha256)])


async def test_the_outbox_full_answers_503_and_loses_nothing(
    gateway_factory, worker_factory, datahaul_env, data_dir, fault_proxy
):
    """At its quota the outbox refuses new packets with 503 and Retry-After,
    keeps every accepted one, and forwards them all once the broker is back."""
    worker_factory("all", env=FAST_RECOVERY)
    fault_proxy.refuse(cut_open=True)
    gateway_factory(
        proxy=fault_proxy,
        healthy_only=False,
        env={"DATAHAUL_OUTBOX_QUOTA_BYTES": "600000"},
    )
    url = datahaul_env["DATAHAUL_GATEWAY_URL"]

    accepted, refused = [], None
    for index in range(20):
        source = SourceFile(
            f"quota-{index}", "video", os.urandom(100_000), chunk=100_000
        )
        status, answer = await asyncio.to_thread(post_packets, url, source.packets())
        if status == 503:
            refused = answer
            break
        assert status == 202, answer
        accepted.append(source)
    assert refused is not None
    assert refused["error"] == "OutboxFull"
    assert 3 <= len(accepted) < 20

    fault_proxy.pass_through()
    await _all_stored_once(
        datahaul_env, data_dir, [(f.file_id, f.sha256) for f in accepted]
    )


async def test_an_incomplete_file_expires_and_a_late_packet_starts_it_over(
    gateway, worker_factory, datahaul_env, data_dir
):
    """A file left incomplete past the expiry is marked expired and its staged
    data removed; packets arriving later start it over and can complete it."""
    worker_factory("all", env={**FAST_RECOVERY, "DATAHAUL_EXPIRE_AFTER": "1.5"})
    url = datahaul_env["DATAHAUL_GATEWAY_URL"]
    video = SourceFile("left-behind", "video", os.urandom(300_000), chunk=100_000)
    status, _ = post_packets(url, video.packets()[:2])
    assert status == 200

    await _wait_state(datahaul_env, video.file_id, "expired")
    rows, folders = await asyncio.to_thread(
        staged_leftovers, datahaul_env["DATAHAUL_CATALOG_URL"], str(data_dir)
    )
    assert (rows, folders) == (0, [])

    status, _ = post_packets(url, video.packets())
    assert status == 200
    await _all_stored_once(datahaul_env, data_dir, [(video.file_id, video.sha256)])


async def _wait_chunks(env: dict[str, str], file_id: str, count: int) -> None:
    catalog = Catalog.open(env["DATAHAUL_CATALOG_URL"])
    deadline = time.monotonic() + 120.0
    try:
        while time.monotonic() < deadline:
            record = catalog.get(file_id)
            if record is not None and record.received >= count:
                return
            await asyncio.sleep(0.05)
    finally:
        catalog.close()
    raise AssertionError(f"{file_id} never had {count} chunks staged")


async def _wait_state(
    env: dict[str, str], file_id: str, state: str, timeout: float = 180.0
) -> None:
    catalog = Catalog.open(env["DATAHAUL_CATALOG_URL"])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            record = catalog.get(file_id)
            if record is not None and record.state == state:
                return
            await asyncio.sleep(0.02)
    finally:
        catalog.close()
    raise AssertionError(f"{file_id} never reached {state} in {timeout:g}s")


async def _publish_and_collect_dead(amqp_url: str, bodies: list[bytes]) -> list[str]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, content_type=JSON_CONTENT_TYPE),
                routing_key="image_data_queue",
            )
        dead = await channel.get_queue("datahaul_dead_letter_queue")
        reasons: list[str] = []
        deadline = time.monotonic() + 30
        while len(reasons) < len(bodies) and time.monotonic() < deadline:
            message = await dead.get(fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            reasons.append(str((message.headers or {}).get("dh-dead-reason")))
        return reasons
