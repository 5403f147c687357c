"""Small packets of concurrent requests share broker messages.

A broker message with its confirm costs about the same for 1 KiB as for
200 KiB, so one-packet requests arriving together are worth carrying
together. No timer decides when: a lone packet leaves at once, and only
while a few partial bundles already wait for their confirms do new packets
gather for the next one. The busier the gateway, the fuller its bundles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from datahaul.broker.publisher import Outgoing
from datahaul.protocol.packet import Packet

# Partial bundles allowed to wait for confirms at once; a full bundle never
# waits for this (the publisher's own window bounds it).
PARTIAL_IN_FLIGHT = 2
# Room a packet takes in a bundle beyond its data: the frame's JSON header.
FRAME_OVERHEAD = 200

BundleMaker = Callable[[str, list[Packet]], Outgoing]
# Publishes messages or keeps them in the outbox; says how many packets
# went to the outbox (the gateway's own path for every message).
Send = Callable[[list[Outgoing]], Awaitable[int]]


@dataclass
class _Share:
    """One request's packets in one bundle: they are answered together."""

    answer: asyncio.Future[bool]
    packets: int = 0


@dataclass
class _Waiting:
    packets: list[Packet] = field(default_factory=list)
    shares: list[_Share] = field(default_factory=list)
    size: int = 0


class Coalescer:
    """Publishes small packets in shared bundles, or buffers the bundle.

    `submit` returns once each packet is confirmed by RabbitMQ or in the
    outbox, and says how many went to the outbox; it raises what the
    outbox raised (OutboxFull) when a bundle could go to neither.
    """

    def __init__(self, send: Send, make_bundle: BundleMaker, bundle_bytes: int) -> None:
        self._send_messages = send
        self._make_bundle = make_bundle
        self._bundle_bytes = bundle_bytes
        self._waiting: dict[str, _Waiting] = {}
        self._partial_in_flight = 0
        self._sending: set[asyncio.Task[None]] = set()

    def takes(self, packet: Packet) -> bool:
        return len(packet.data) + FRAME_OVERHEAD <= self._bundle_bytes // 32

    async def submit(self, packets: Sequence[Packet]) -> int:
        # One future per bundle a request's packets went into, not one per
        # packet: a batch of 200 would otherwise cost 200 futures and
        # callbacks on the event loop for a single answer.
        loop = asyncio.get_running_loop()
        mine: dict[int, _Share] = {}
        for packet in packets:
            waiting = self._waiting.setdefault(packet.type, _Waiting())
            share = mine.get(id(waiting))
            if share is None:
                share = mine[id(waiting)] = _Share(loop.create_future())
                waiting.shares.append(share)
            share.packets += 1
            waiting.packets.append(packet)
            waiting.size += len(packet.data) + FRAME_OVERHEAD
            if waiting.size >= self._bundle_bytes:
                self._send(packet.type, full=True)
        self._send_partials()

        shares = list(mine.values())
        outcomes = await asyncio.gather(
            *(share.answer for share in shares), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return sum(
            share.packets
            for share, buffered in zip(shares, outcomes, strict=True)
            if buffered
        )

    def _send_partials(self) -> None:
        for data_type in list(self._waiting):
            if self._partial_in_flight >= PARTIAL_IN_FLIGHT:
                return
            self._send(data_type, full=False)

    def _send(self, data_type: str, *, full: bool) -> None:
        waiting = self._waiting.pop(data_type)
        if not full:
            self._partial_in_flight += 1
        task = asyncio.create_task(self._deliver(data_type, waiting, full))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _deliver(self, data_type: str, waiting: _Waiting, full: bool) -> None:
        message = self._make_bundle(data_type, waiting.packets)
        try:
            buffered = await self._send_messages([message]) > 0
        except Exception as exc:
            _answer(waiting.shares, exc)
        else:
            _answer(waiting.shares, buffered)
        finally:
            if not full:
                self._partial_in_flight -= 1
            self._send_partials()


def _answer(shares: list[_Share], outcome: bool | Exception) -> None:
    for share in shares:
        # A request whose client went away was cancelled; nothing to tell it.
        if share.answer.done():
            continue
        if isinstance(outcome, Exception):
            share.answer.set_exception(outcome)
        else:
            share.answer.set_result(outcome)
