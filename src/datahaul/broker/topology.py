"""The exchanges and queues datahaul uses, declared the same way by everyone."""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from datahaul.config import Settings

PACKET_EXCHANGE = "datahaul.packets"
DEAD_EXCHANGE = "datahaul.dead"
DEAD_QUEUE = "datahaul_dead_letter_queue"
EVENT_EXCHANGE = "datahaul.events"
STATUS_EXCHANGE = "datahaul.status"

QUEUES = {
    "text": "text_data_queue",
    "image": "image_data_queue",
    "video": "video_data_queue",
}


def queue_for(data_type: str) -> str:
    """The queue, and routing key, of a data type (as in the design note)."""
    return QUEUES[data_type]


def queue_arguments(settings: Settings) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-queue-type": settings.queue_type,
        "x-dead-letter-exchange": DEAD_EXCHANGE,
    }
    if settings.queue_type == "quorum":
        # The broker dead-letters a packet redelivered this many times, so a
        # packet that crashes every worker cannot circle forever.
        arguments["x-delivery-limit"] = settings.delivery_limit
    return {**arguments, **replication_arguments(settings)}


def replication_arguments(settings: Settings) -> dict[str, Any]:
    """How many nodes hold a copy of each quorum queue; none: the broker decides."""
    if settings.queue_type != "quorum" or not settings.quorum_group_size:
        return {}
    return {"x-quorum-initial-group-size": settings.quorum_group_size}


class DeclareOnce:
    """Declares the topology on a process's first connection, only checks it after.

    A declare writes to the cluster's metadata store on every node, so it
    waits while any cluster node hangs, until the cluster gives that node
    up (a minute or more); a passive lookup reads locally and answers at
    once. A process that moves off a failed node is thus back at work in
    moments, and declares again only when the topology has gone missing.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._declared = False

    async def apply(self, channel: AbstractChannel) -> AbstractExchange:
        """The packet exchange, on this channel, with every queue in place."""
        if not self._declared:
            exchange = await declare(channel, self.settings)
            self._declared = True
            return exchange
        try:
            return await look_up(channel)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            # Deleted since: the caller's next attempt declares it afresh.
            self._declared = False
            raise


async def look_up(channel: AbstractChannel) -> AbstractExchange:
    """The packet exchange, once passive declares found it and every queue."""
    for name in (*QUEUES.values(), DEAD_QUEUE):
        await channel.declare_queue(name, passive=True)
    return await channel.get_exchange(PACKET_EXCHANGE)


async def declare(channel: AbstractChannel, settings: Settings) -> AbstractExchange:
    """Declare everything; safe to repeat, and the same for every process."""
    packets = await channel.declare_exchange(
        PACKET_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dead = await channel.declare_exchange(
        DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    await channel.declare_exchange(
        EVENT_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    await channel.declare_exchange(
        STATUS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )

    dead_queue = await channel.declare_queue(
        DEAD_QUEUE,
        durable=True,
        arguments={
            "x-queue-type": settings.queue_type,
            **replication_arguments(settings),
        },
    )
    await dead_queue.bind(dead, routing_key="")

    for name in QUEUES.values():
        queue = await channel.declare_queue(
            name, durable=True, arguments=queue_arguments(settings)
        )
        await queue.bind(packets, routing_key=name)
    return packets
