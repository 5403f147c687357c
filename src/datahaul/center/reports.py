"""Gateway status reports: each gateway tells the center how its link and outbox are.

A gateway publishes its health every two seconds to the `datahaul.status`
topic exchange under `gateway.<id>`, non-persistent and without confirms: a
report lost on the way is replaced by the next one, and a report must never
hold up a packet. The center keeps the latest report of each gateway and
calls a gateway stale once no report came for a few intervals, which is
also what a gateway cut off from RabbitMQ looks like from the center.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import msgspec
import structlog
from aio_pika.abc import AbstractConnection, AbstractExchange

from datahaul.broker import topology
from datahaul.broker.connection import BROKER_FAILURES, NodeRing
from datahaul.config import Settings
from datahaul.errors import BrokerError

log = structlog.get_logger("datahaul.reports")

REPORT_INTERVAL = 2.0
CLOSE_TIMEOUT = 2.0
STALE_AFTER = 3 * REPORT_INTERVAL + 0.5
FORGET_AFTER = 3600.0
ROUTING_PREFIX = "gateway."
BINDING = ROUTING_PREFIX + "#"

Health = Callable[[], dict[str, Any]]


def gateway_id(settings: Settings) -> str:
    """A name that tells gateways apart: the host and the port it serves on."""
    return f"{socket.gethostname()}:{settings.gateway_port}"


async def declare_status_exchange(channel: aio_pika.abc.AbstractChannel) -> Any:
    # Declared exactly as topology.declare does, so either may come first.
    return await channel.declare_exchange(
        topology.STATUS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )


class StatusReporter:
    """Publishes a gateway's health on a connection of its own, forever."""

    def __init__(
        self,
        settings: Settings,
        reporter_id: str,
        health: Health,
        interval: float = REPORT_INTERVAL,
    ) -> None:
        self.reporter_id = reporter_id
        self.health = health
        self.interval = interval
        self.ring = NodeRing(
            settings.amqp_urls, f"datahaul-gateway-status {reporter_id}"
        )
        self.sent = 0

    def report(self) -> bytes:
        body = dict(self.health())
        body.update({"gateway_id": self.reporter_id, "sent_at": time.time()})
        return msgspec.json.encode(body)

    async def run(self) -> None:
        """Report until cancelled; broker trouble only delays the next report."""
        while True:
            try:
                connection = await self.ring.connect()
            except BrokerError as exc:
                log.debug("status.unreachable", error=str(exc))
                raise_if_cancelled()
                await asyncio.sleep(self.interval)
                continue
            try:
                raise_if_cancelled()
                await self._publish_while_open(connection)
            except BROKER_FAILURES as exc:
                log.debug("status.link_lost", error=repr(exc))
            finally:
                await close_quietly(connection)
            raise_if_cancelled()
            await asyncio.sleep(self.interval)

    async def _publish_while_open(self, connection: AbstractConnection) -> None:
        channel = await asyncio.wait_for(
            connection.channel(publisher_confirms=False), CLOSE_TIMEOUT
        )
        exchange: AbstractExchange = await asyncio.wait_for(
            declare_status_exchange(channel), CLOSE_TIMEOUT
        )
        while not channel.is_closed:
            message = aio_pika.Message(
                self.report(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                expiration=self.interval * 5,
            )
            await asyncio.wait_for(
                exchange.publish(
                    message, ROUTING_PREFIX + self.reporter_id, mandatory=False
                ),
                self.interval,
            )
            self.sent += 1
            await asyncio.sleep(self.interval)


def raise_if_cancelled() -> None:
    """Re-raise a cancel that a driver call swallowed or turned into an error.

    asyncio.wait_for, which the AMQP client uses inside, can lose a cancel
    that lands as its call completes; without this check a loop that should
    stop would reconnect and run on, and its owner would wait for it forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def close_quietly(connection: AbstractConnection) -> None:
    """Close a connection, giving up after a moment: a broker that is going
    down may never answer the close, and a shutdown must not wait for it."""
    with contextlib.suppress(*BROKER_FAILURES):
        await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)


@dataclass
class Report:
    gateway_id: str
    body: dict[str, Any]
    received_at: float


class ReportBook:
    """The latest report of each gateway, judged by when it arrived here.

    Arrival time, not the gateway's own clock, decides staleness, so that a
    vehicle with a wrong clock is still judged fairly.
    """

    def __init__(
        self,
        stale_after: float = STALE_AFTER,
        forget_after: float = FORGET_AFTER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stale_after = stale_after
        self.forget_after = forget_after
        self.clock = clock
        self.reports: dict[str, Report] = {}
        self.rejected = 0

    def take(self, body: bytes) -> str | None:
        """Keep a report; return its gateway id, or None for a malformed one."""
        with contextlib.suppress(msgspec.DecodeError):
            decoded = msgspec.json.decode(body)
            name = decoded.get("gateway_id") if isinstance(decoded, dict) else None
            if isinstance(name, str):
                self.reports[name] = Report(name, decoded, self.clock())
                return name
        self.rejected += 1
        return None

    def gateways(self) -> list[dict[str, Any]]:
        """Each gateway's last report, its age, and whether it is stale."""
        now = self.clock()
        for name in [
            n
            for n, r in self.reports.items()
            if now - r.received_at > self.forget_after
        ]:
            del self.reports[name]
        return [
            _summary(report, now, self.stale_after)
            for report in sorted(self.reports.values(), key=lambda r: r.gateway_id)
        ]


def _summary(report: Report, now: float, stale_after: float) -> dict[str, Any]:
    body = report.body
    outbox = body.get("outbox")
    if not isinstance(outbox, dict):
        outbox = {}
    age = max(0.0, now - report.received_at)
    stale = age > stale_after
    return {
        "gateway_id": report.gateway_id,
        "broker": body.get("broker", "unknown"),
        "broker_error": body.get("broker_error"),
        "outbox_packets": int(outbox.get("packets", 0) or 0),
        "outbox_bytes": int(outbox.get("bytes", 0) or 0),
        "outbox_quota_bytes": int(outbox.get("quota_bytes", 0) or 0),
        "counters": body.get("counters", {}),
        "uptime_seconds": body.get("uptime_seconds"),
        "age_seconds": round(age, 1),
        "stale": stale,
        "link": "stale" if stale else body.get("broker", "unknown"),
    }
