"""Small packets of concurrent requests share broker messages, and each
request still hears exactly where its packet went."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import aio_pika
import aiohttp

from datahaul.protocol import wire
from pipeline_helpers import call

REQUESTS = 300


def _one_packet_file(index: int) -> dict[str, object]:
    return {
        "type": "text",
        "file_id": f"note-{index}",
        "seq": 1,
        "total_seq": 1,
        "data": base64.b64encode(f"line {index}\n".encode() * 60).decode(),
    }


async def _post_all(base: str) -> list[tuple[int, dict[str, object]]]:
    connector = aiohttp.TCPConnector(limit=REQUESTS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(index: int) -> tuple[int, dict[str, object]]:
            async with session.post(
                f"{base}/v1/packets", json=_one_packet_file(index)
            ) as answer:
                return answer.status, await answer.json()

        return await asyncio.gather(*(post(i) for i in range(REQUESTS)))


async def _drain_text_queue(amqp_url: str) -> tuple[int, list[tuple[str, int]]]:
    """Every message on the text queue: how many, and the packets they carry."""
    connection = await aio_pika.connect(amqp_url)
    messages = 0
    keys: list[tuple[str, int]] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue("text_data_queue")
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages += 1
            for packet in wire.decode_message(
                message.body,
                message.headers,
                message.content_type,
                "text",
                1 << 20,
            ):
                keys.append((packet.file_id, packet.seq))
    return messages, keys


async def test_concurrent_one_packet_requests_travel_in_shared_bundles(
    gateway, datahaul_env, amqp_url
):
    answers = await _post_all(datahaul_env["DATAHAUL_GATEWAY_URL"])

    assert {status for status, _ in answers} == {200}, answers[:3]
    assert all(a["published"] == 1 and a["buffered"] == 0 for _, a in answers)
    messages, keys = await _drain_text_queue(amqp_url)
    assert sorted(keys) == sorted((f"note-{i}", 1) for i in range(REQUESTS))
    assert messages < REQUESTS


async def test_with_the_link_cut_every_coalesced_packet_is_buffered_and_forwarded(
    gateway_factory, datahaul_env, amqp_url, fault_proxy
):
    gateway_factory(proxy=fault_proxy)
    base = datahaul_env["DATAHAUL_GATEWAY_URL"]
    fault_proxy.refuse(cut_open=True)
    await _until(base, lambda health: health["broker"] == "down")

    answers = await _post_all(base)

    assert {status for status, _ in answers} == {202}, answers[:3]
    assert all(a["buffered"] == 1 for _, a in answers)
    assert (await _health(base))["outbox"]["packets"] == REQUESTS

    fault_proxy.pass_through()
    await _until(base, lambda health: health["outbox"]["packets"] == 0)
    messages, keys = await _drain_text_queue(amqp_url)
    assert sorted(keys) == sorted((f"note-{i}", 1) for i in range(REQUESTS))
    assert messages < REQUESTS


async def _health(base: str) -> Any:
    _, health = await asyncio.to_thread(call, f"{base}/healthz")
    return health


async def _until(base: str, wanted: Callable[[Any], bool]) -> None:
    for _ in range(300):
        if wanted(await _health(base)):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the gateway's health never came true: {await _health(base)}")
