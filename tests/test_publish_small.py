"""publish_small: many small messages at once, each confirmed, none kept in line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq

from datahaul.broker.publisher import publish_small, underlay_of

CROWD = 500


async def turns_to_confirm(publish: Callable[[int], Awaitable[object]]) -> int:
    """Turns of the event loop until every publish of the crowd is confirmed."""
    turns = 0

    async def count() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count())
    try:
        await asyncio.gather(*(publish(n) for n in range(CROWD)))
    finally:
        counter.cancel()
    return turns


async def test_a_crowd_of_small_publishes_is_confirmed_without_queueing(
    amqp_url: str,
) -> None:
    """Far more publishes than the write queue holds, started together, all
    arrive; aiormq's own publish, side by side, takes the channel's lock one
    turn of the loop after another, and publish_small does not."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True)
        underlay = await underlay_of(channel)

        def ours(n: int) -> Awaitable[None]:
            message = aio_pika.Message(f"event {n}".encode())
            return publish_small(
                underlay, message, exchange="", routing_key=queue.name, timeout=10.0
            )

        def aiormq_default(n: int) -> Awaitable[aiormq.abc.ConfirmationFrameType]:
            return underlay.basic_publish(b"plain", routing_key=queue.name)

        in_line = await turns_to_confirm(aiormq_default)
        not_in_line = await turns_to_confirm(ours)

        assert not_in_line * 2 < in_line, (not_in_line, in_line)
        bodies = set()
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                if message.body != b"plain":
                    bodies.add(message.body)
                if len(bodies) == CROWD:
                    break
        assert bodies == {f"event {n}".encode() for n in range(CROWD)}
