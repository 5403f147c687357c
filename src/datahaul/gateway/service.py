"""The gateway's core: accept checked packets and hand them to RabbitMQ.

Whatever RabbitMQ does not confirm goes to the outbox, so a 2xx always
means the packet is either in the broker or on the gateway's disk.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from datahaul import metrics
from datahaul.broker import topology
from datahaul.broker.publisher import ConfirmingPublisher, Outgoing
from datahaul.center.reports import StatusReporter, gateway_id
from datahaul.config import Settings
from datahaul.errors import BrokerError
from datahaul.gateway.coalescer import Coalescer
from datahaul.gateway.ledger import Ledger
from datahaul.gateway.outbox import Outbox
from datahaul.protocol import wire
from datahaul.protocol.packet import Packet

log = structlog.get_logger("datahaul.gateway")

LEDGER_KEEP_SECONDS = 7 * 24 * 3600.0


@dataclass
class Accepted:
    packets: int
    published: int
    buffered: int

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.packets,
            "published": self.published,
            "buffered": self.buffered,
            "status": "buffered" if self.buffered else "published",
        }


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        local = settings.data_dir / "gateway"
        self.ledger = Ledger(local / "ledger.db", settings.ledger_files)
        self.outbox = Outbox(local / "outbox.db", settings.outbox_quota_bytes)
        self.publisher = ConfirmingPublisher(
            settings, "datahaul-gateway", on_link_change=self._link_changed
        )
        self.coalescer = Coalescer(
            self._publish_or_buffer, bundle_message, settings.bundle_bytes
        )
        self.started_at = time.time()
        self.counters = {"accepted": 0, "published": 0, "buffered": 0, "rejected": 0}
        self._tasks: list[asyncio.Task[None]] = []
        self.reporter = StatusReporter(settings, gateway_id(settings), self.health)
        metrics.GATEWAY.watch(self.outbox, self.publisher)

    async def start(self) -> None:
        await self.publisher.start()
        self._tasks.append(
            asyncio.create_task(
                self.outbox.forward_forever(self.publisher), name="outbox"
            )
        )
        self._tasks.append(asyncio.create_task(self._prune_ledger(), name="ledger"))
        self._tasks.append(asyncio.create_task(self.reporter.run(), name="status"))
        await self.publisher.wait_up(5.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.publisher.close()
        self.outbox.close()
        await self.ledger.close()

    async def accept(
        self, packets: Sequence[Packet], *, framed: bytes | None = None
    ) -> Accepted:
        """Publish or buffer checked packets; OutboxFull when neither can take them.

        `framed` is the bundle body the packets were decoded from: they are
        then sent together, as that body when they share a type, so that a
        robot's run of large chunks costs the broker one message, not one
        each, and the gateway no copy of it.
        """
        self.ledger.check(packets)
        if framed is not None:
            small, large = [], list(packets)
            planned = bundles_as_framed(large, framed)
        else:
            small = [p for p in packets if self.coalescer.takes(p)]
            large = [p for p in packets if not self.coalescer.takes(p)]
            planned = plan_messages(large, self.settings)

        sending = []
        if large:
            sending.append(self._publish_or_buffer(planned))
        if small:
            sending.append(self.coalescer.submit(small))
        buffered = 0
        for outcome in await asyncio.gather(*sending, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
            buffered += outcome
        self.ledger.record(packets)

        self.counters["accepted"] += len(packets)
        self.counters["buffered"] += buffered
        self.counters["published"] += len(packets) - buffered
        metrics.GATEWAY.record_accepted(packets)
        return Accepted(len(packets), len(packets) - buffered, buffered)

    async def _publish_or_buffer(self, messages: list[Outgoing]) -> int:
        """Publish each message, keep the unconfirmed ones in the outbox, and
        say how many packets went there."""
        published: list[Outgoing] = []
        failed: list[Outgoing] = []
        if self.publisher.link_up:
            results = await asyncio.gather(
                *(self.publisher.publish(m) for m in messages), return_exceptions=True
            )
            for message, result in zip(messages, results, strict=True):
                if isinstance(result, BrokerError):
                    failed.append(message)
                elif isinstance(result, BaseException):
                    raise result
                else:
                    published.append(message)
        else:
            failed = list(messages)

        if failed:
            await self.outbox.put(failed)
        metrics.GATEWAY.record_sent(published, buffered=False)
        metrics.GATEWAY.record_sent(failed, buffered=True)
        return sum(max(1, len(m.keys)) for m in failed)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.publisher.link_up else "degraded",
            "broker": "up" if self.publisher.link_up else "down",
            "broker_error": None
            if self.publisher.link_up
            else self.publisher.last_error,
            "outbox": {
                "packets": self.outbox.packets,
                "bytes": self.outbox.bytes,
                "quota_bytes": self.outbox.quota_bytes,
            },
            "counters": dict(self.counters),
            "uptime_seconds": round(time.time() - self.started_at, 1),
        }

    async def _link_changed(self, up: bool) -> None:
        if up:
            self.outbox.wake()

    async def _prune_ledger(self) -> None:
        while True:
            await asyncio.sleep(3600)
            forgotten = await self.ledger.forget_older_than(LEDGER_KEEP_SECONDS)
            if forgotten:
                log.info("ledger.pruned", files=forgotten)


def plan_messages(packets: Sequence[Packet], settings: Settings) -> list[Outgoing]:
    """One message per large packet; small ones share bundles by type.

    A broker message costs about the same whatever its size up to a few
    hundred KiB, so small packets travel together.
    """
    messages: list[Outgoing] = []
    small: dict[str, list[Packet]] = {}
    for packet in packets:
        if len(packet.data) * 4 >= settings.bundle_bytes or len(packets) == 1:
            messages.append(single_message(packet))
        else:
            small.setdefault(packet.type, []).append(packet)

    for data_type, group in small.items():
        bundle: list[Packet] = []
        size = 0
        for packet in group:
            if bundle and size + len(packet.data) > settings.bundle_bytes:
                messages.append(bundle_message(data_type, bundle))
                bundle, size = [], 0
            bundle.append(packet)
            size += len(packet.data) + 200
        if bundle:
            messages.append(bundle_message(data_type, bundle))
    return messages


def bundles_as_framed(packets: Sequence[Packet], framed: bytes) -> list[Outgoing]:
    """The packets decoded from the bundle body `framed`, as bundle messages:
    that very body when they share a type, else one new bundle per type.

    The body is only reused once every packet in it has been checked, and it
    decodes at the worker exactly as it did here.
    """
    by_type: dict[str, list[Packet]] = {}
    for packet in packets:
        by_type.setdefault(packet.type, []).append(packet)
    if len(by_type) > 1 or len(packets) == 1:
        return [bundle_message(kind, group) for kind, group in by_type.items()]
    return [bundle_of(packets[0].type, packets, framed)]


def single_message(packet: Packet) -> Outgoing:
    return Outgoing(
        routing_key=topology.queue_for(packet.type),
        body=packet.data,
        headers=wire.packet_headers(packet),
        content_type=wire.RAW_CONTENT_TYPE,
        message_id=f"{packet.file_id}/{packet.seq}",
        keys=[(packet.file_id, packet.seq)],
    )


def bundle_message(data_type: str, packets: list[Packet]) -> Outgoing:
    if len(packets) == 1:
        return single_message(packets[0])
    return bundle_of(data_type, packets, wire.encode_bundle(packets))


def bundle_of(data_type: str, packets: Sequence[Packet], body: bytes) -> Outgoing:
    return Outgoing(
        routing_key=topology.queue_for(data_type),
        body=body,
        headers={"dh-packets": len(packets)},
        content_type=wire.BUNDLE_CONTENT_TYPE,
        message_id=uuid.uuid4().hex,
        keys=[(p.file_id, p.seq) for p in packets],
    )
