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
