"""The center's one connection to RabbitMQ: gateway reports in, queue depths out.

The center only watches: it declares nothing but the status exchange and a
private queue for the reports, and asks about datahaul's queues passively,
so that it can never change how the pipeline's queues are set up.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from datahaul.broker import topology
from datahaul.broker.connection import BROKER_FAILURES, NodeRing, wait_closed
from datahaul.center.reports import (
    BINDING,
    ReportBook,
    close_quietly,
    declare_status_exchange,
    raise_if_cancelled,
)
from datahaul.config import Settings
from datahaul.errors import BrokerError

log = structlog.get_logger("datahaul.center")

WATCHED_QUEUES = (*topology.QUEUES.values(), topology.DEAD_QUEUE)
ASK_TIMEOUT = 2.0


@dataclass
class QueueDepth:
    """What a passive declare says of one queue; None where it could not say."""

    queue: str
    messages: int | None
    consumers: int | None
    state: str  # "ok", "missing" or "unknown"

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "messages": self.messages,
            "consumers": self.consumers,
            "state": self.state,
        }


class BrokerWatch:
    def __init__(self, settings: Settings, book: ReportBook) -> None:
        self.book = book
        self.ring = NodeRing(settings.amqp_urls, "datahaul-center")
        self.link_up = False
        self.last_error: str | None = "not connected yet"
        self._connection: AbstractConnection | None = None
        self._inspect: AbstractChannel | None = None

    async def run(self) -> None:
        """Stay connected and consume reports until cancelled."""
        delay = 0.2
        while True:
            try:
                connection = await self.ring.connect()
            except BrokerError as exc:
                self._down(str(exc))
                raise_if_cancelled()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue

            delay = 0.2
            try:
                raise_if_cancelled()
                channel = await self._listen(connection)
                self._connection = connection
                self.link_up, self.last_error = True, None
                log.info("center.broker_up")
                await wait_closed(connection, channel)
            except BROKER_FAILURES as exc:
                self._down(repr(exc))
            finally:
                await close_quietly(connection)
            self._down(self.last_error or "connection closed")
            raise_if_cancelled()
            await asyncio.sleep(delay)

    async def _listen(self, connection: AbstractConnection) -> AbstractChannel:
        channel = await connection.channel()
        exchange = await declare_status_exchange(channel)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=BINDING)
        await queue.consume(self._on_report, no_ack=True)
        return channel

    async def _on_report(self, message: AbstractIncomingMessage) -> None:
        if self.book.take(message.body) is None:
            log.warning("center.report_rejected", routing_key=message.routing_key)

    def _down(self, error: str) -> None:
        if self.link_up:
            log.warning("center.broker_down", error=error)
        self.link_up = False
        self.last_error = error
        self._connection = None
        self._inspect = None

    async def queue_depths(self) -> list[QueueDepth]:
        """Ready messages and consumers of each datahaul queue, asked passively."""
        depths = []
        for name in WATCHED_QUEUES:
            try:
                depths.append(await self._ask(name))
            except BROKER_FAILURES as exc:
                log.debug("center.queue_unknown", queue=name, error=repr(exc))
                self._inspect = None
                depths.append(QueueDepth(name, None, None, "unknown"))
        return depths

    async def _ask(self, name: str) -> QueueDepth:
        connection = self._connection
        if connection is None or connection.is_closed:
            return QueueDepth(name, None, None, "unknown")
        if self._inspect is None or self._inspect.is_closed:
            self._inspect = await asyncio.wait_for(connection.channel(), ASK_TIMEOUT)
        try:
            queue = await self._inspect.declare_queue(
                name, passive=True, timeout=ASK_TIMEOUT
            )
        except aio_pika.exceptions.ChannelNotFoundEntity:
            # The broker closed the channel with the refusal; ask on a new one.
            self._inspect = None
            return QueueDepth(name, None, None, "missing")
        result = queue.declaration_result
        return QueueDepth(
            name, result.message_count or 0, result.consumer_count or 0, "ok"
        )

    def to_json(self) -> dict[str, Any]:
        return {"up": self.link_up, "error": self.last_error}
