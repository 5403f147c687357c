"""The worker process: consume packets, stage them, ack, finalize whole files.

Acks follow durability: a delivery is acked only after its chunk is in the
catalog (and staging store), or after it went to the dead-letter queue.
Everything a worker knows lives in the catalog, so a worker may die at any
point and another one carries on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import msgspec
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from datahaul import metrics
from datahaul.broker import topology
from datahaul.broker.connection import BROKER_FAILURES, NodeRing, wait_closed
from datahaul.broker.publisher import publish_small, underlay_of
from datahaul.config import Settings
from datahaul.errors import BrokerError, DatahaulError, PacketError
from datahaul.protocol import wire
from datahaul.protocol.packet import Packet
from datahaul.storage.blobs import open_store
from datahaul.storage.catalog import Catalog, FileRecord
from datahaul.storage.sql import DATABASE_FAILURES
from datahaul.worker.assembler import Assembler, Finalized

log = structlog.get_logger("datahaul.worker")

# Failures of our own storage, not of the packet: retry, never dead-letter.
STORAGE_FAILURES: tuple[type[BaseException], ...] = (
    DatahaulError,
    OSError,
    *DATABASE_FAILURES,
)
DEAD_LETTER_FAILURES: tuple[type[BaseException], ...] = (
    BrokerError,
    aio_pika.exceptions.DeliveryError,
    *BROKER_FAILURES,
)
RETRY_DELAY = 1.0
ANNOUNCES_IN_FLIGHT = 8


@dataclass
class Delivery:
    queue_type: str
    message: AbstractIncomingMessage


@dataclass
class BatchResult:
    """What staging decided for each delivery of a batch."""

    poison: dict[int, str] = field(default_factory=dict)
    conflicts: dict[int, list[tuple[Packet, str]]] = field(default_factory=dict)
    complete: set[str] = field(default_factory=set)
    finished: list[FileRecord] = field(default_factory=list)
    packets: int = 0
    duplicates: int = 0


class Worker:
    def __init__(self, settings: Settings, types: Sequence[str]) -> None:
        self.settings = settings
        self.types = list(types)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.catalog = Catalog.open(settings.catalog_url)
        self.assembler = Assembler(
            settings,
            self.catalog,
            staging=open_store(settings.staging_url),
            blobs=open_store(settings.blob_url),
            owner=self.owner,
        )
        self.ring = NodeRing(settings.amqp_urls, f"datahaul-worker {self.owner}")
        self.topology = topology.DeclareOnce(settings)
        self._stage_pool = ThreadPoolExecutor(1, thread_name_prefix="stage")
        self._final_pool = ThreadPoolExecutor(1, thread_name_prefix="finalize")
        self._finalizing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._announcing = asyncio.Semaphore(ANNOUNCES_IN_FLIGHT)
        self._events: aiormq.Channel | None = None
        self._dead: AbstractExchange | None = None
        self.stats = {"packets": 0, "duplicates": 0, "dead": 0, "stored": 0}

    async def run(self) -> None:
        """Consume until cancelled, reconnecting whenever the broker goes away."""
        log.info("worker.started", owner=self.owner, types=self.types)
        sweeper = asyncio.create_task(self._sweep_forever(), name="sweeper")
        try:
            await self._consume_forever()
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            self._stage_pool.shutdown(wait=True, cancel_futures=True)
            self._final_pool.shutdown(wait=True, cancel_futures=True)
            self.assembler.close()
            self.catalog.close()

    async def _consume_forever(self) -> None:
        delay = 0.2
        while True:
            try:
                connection = await self.ring.connect()
            except BrokerError as exc:
                log.warning("worker.broker_unreachable", error=str(exc), retry_in=delay)
                metrics.WORKER.error("broker_unreachable")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue

            delay = 0.2
            try:
                async with connection:
                    channel = await connection.channel(publisher_confirms=True)
                    drain = await self._serve(channel)
                    closed = asyncio.create_task(wait_closed(connection, channel))
                    await asyncio.wait(
                        [drain, closed], return_when=asyncio.FIRST_COMPLETED
                    )
                    if drain.done() and not drain.cancelled() and drain.exception():
                        # Unacked deliveries go back to the queue; the broker's
                        # delivery limit stops a packet that crashes us each time.
                        log.error("worker.batch_crashed", error=repr(drain.exception()))
                        metrics.WORKER.error("batch_crashed")
                    for task in (drain, closed):
                        task.cancel()
                    await asyncio.gather(drain, closed, return_exceptions=True)
            except BROKER_FAILURES as exc:
                log.warning("worker.connection_lost", error=repr(exc))
                metrics.WORKER.error("broker_lost")
            finally:
                self._events = self._dead = None
            # The node may be gone or hung: try the others first.
            self.ring.skip_current()
            log.warning("worker.disconnected", retry_in=delay)
            await asyncio.sleep(delay)

    async def _serve(self, channel: AbstractChannel) -> asyncio.Task[None]:
        await self.topology.apply(channel)
        # Events go to the exchange by name; this fails now if it is missing.
        await channel.get_exchange(topology.EVENT_EXCHANGE)
        self._events = await underlay_of(channel)
        self._dead = await channel.get_exchange(topology.DEAD_EXCHANGE)
        inbox: asyncio.Queue[Delivery] = asyncio.Queue()

        prefetch = {t: self._prefetch_for(t) for t in self.types}
        for data_type in self.types:
            # Without `global`, RabbitMQ applies the limit to each consumer
            # started after it on this channel.
            await channel.set_qos(prefetch_count=prefetch[data_type])
            queue = await channel.get_queue(topology.queue_for(data_type))
            await queue.consume(_enqueue(inbox, data_type))
        log.info(
            "worker.consuming",
            queues=[topology.queue_for(t) for t in self.types],
            prefetch={topology.queue_for(t): n for t, n in prefetch.items()},
        )
        return asyncio.create_task(self._drain(inbox), name="drain")

    def _prefetch_for(self, data_type: str) -> int:
        # Image and video messages carry up to a MiB of chunks each, or one
        # larger chunk: their limit bounds the bytes a worker holds unstaged.
        if data_type == "text":
            return self.settings.prefetch
        return self.settings.large_prefetch

    async def _drain(self, inbox: asyncio.Queue[Delivery]) -> None:
        """Take deliveries in batches: one catalog transaction for many packets."""
        while True:
            batch = [await inbox.get()]
            size = len(batch[0].message.body)
            while (
                not inbox.empty()
                and len(batch) < self.settings.batch_packets
                and size < self.settings.bundle_bytes * 32
            ):
                delivery = inbox.get_nowait()
                batch.append(delivery)
                size += len(delivery.message.body)
            await self._handle(batch)

    async def _handle(self, batch: list[Delivery]) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._stage_pool, self._stage, batch)
        except STORAGE_FAILURES as exc:
            # Our storage failed, not the packets: give them back to the
            # broker after a pause, so another try (here or elsewhere) can
            # succeed once the storage is back.
            log.error("worker.stage_failed", error=repr(exc), packets=len(batch))
            metrics.WORKER.error("stage_failed")
            await asyncio.sleep(RETRY_DELAY)
            for delivery in batch:
                await _settle(delivery.message.nack(requeue=True))
            return

        requeued: set[int] = set()
        for index in sorted({*result.poison, *result.conflicts}):
            delivery = batch[index]
            try:
                if index in result.poison:
                    await self._dead_letter(delivery, result.poison[index])
                for packet, reason in result.conflicts.get(index, []):
                    await self._dead_letter_packet(delivery, packet, reason)
            except DEAD_LETTER_FAILURES as exc:
                # Unacked, the packet comes back and is judged again.
                log.warning("packet.dead_letter_failed", error=repr(exc))
                metrics.WORKER.error("dead_letter_failed")
                await _settle(delivery.message.nack(requeue=True))
                requeued.add(index)

        # One ack frame for the whole batch: batches are settled one at a
        # time, in delivery order, so every unsettled delivery up to this
        # tag on the channel belongs to this batch and is staged.
        acked = [d for i, d in enumerate(batch) if i not in requeued]
        if acked:
            await _settle(acked[-1].message.ack(multiple=True))

        self.stats["packets"] += result.packets
        self.stats["duplicates"] += result.duplicates
        for file_id in result.complete:
            self.schedule_finalize(file_id)
        if result.finished:
            self.stats["stored"] += len(result.finished)
            # The next batch need not wait for these confirms; the bound
            # keeps a slow broker from piling up unsent events in memory.
            await self._announcing.acquire()
            self._spawn(self._announce_then_release(result.finished), "announce")

    def _stage(self, batch: list[Delivery]) -> BatchResult:
        result = BatchResult()
        packets: list[Packet] = []
        owners: list[int] = []
        for index, delivery in enumerate(batch):
            message = delivery.message
            try:
                decoded = wire.decode_message(
                    message.body,
                    message.headers,
                    message.content_type,
                    delivery.queue_type,
                    self.settings.max_chunk_bytes,
                )
            except PacketError as exc:
                metrics.WORKER.error("poison")
                result.poison[index] = str(exc)
                continue
            packets.extend(decoded)
            owners.extend([index] * len(decoded))

        staged = self.assembler.stage(packets)
        result.complete, result.finished = staged.complete, staged.finished
        metrics.WORKER.record_staged(staged.outcomes)
        for record in staged.finished:
            metrics.WORKER.record_finalized(Finalized(record, record.state, 0.0))
        for owner, outcome in zip(owners, staged.outcomes, strict=True):
            if outcome.status == "conflict":
                result.conflicts.setdefault(owner, []).append(
                    (outcome.packet, outcome.reason)
                )
            elif outcome.status == "duplicate":
                result.duplicates += 1
        result.packets = len(packets)
        return result

    def schedule_finalize(self, file_id: str) -> None:
        if file_id in self._finalizing:
            return
        self._finalizing.add(file_id)
        self._spawn(self._finalize(file_id), f"finalize {file_id}")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce_then_release(self, records: Sequence[FileRecord]) -> None:
        try:
            await self._announce(records)
        finally:
            self._announcing.release()

    async def _finalize(self, file_id: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            done = await loop.run_in_executor(
                self._final_pool, self.assembler.finalize, file_id
            )
        except STORAGE_FAILURES as exc:
            # The lease runs out and a sweeper (ours or another worker's)
            # tries again; the half-written blob is replaced then.
            log.error("file.finalize_failed", file_id=file_id, error=repr(exc))
            metrics.WORKER.error("finalize_failed")
            return
        finally:
            self._finalizing.discard(file_id)
        if done is None:
            return
        metrics.WORKER.record_finalized(done)
        if done.state == "stored":
            self.stats["stored"] += 1
            size = done.record.size or 0
            log.info(
                "file.stored",
                file_id=file_id,
                type=done.record.type,
                bytes=size,
                packets=done.record.total_seq,
                seconds=round(done.duration, 3),
                linked=done.linked,
            )
        await self._announce([done.record])

    async def _announce(self, records: Sequence[FileRecord]) -> None:
        """Tell other center systems; the sweeper retries what fails here."""
        channel = self._events
        if channel is None:
            return
        results = await asyncio.gather(
            *(self._publish_event(channel, record) for record in records),
            return_exceptions=True,
        )
        sent = []
        for record, outcome in zip(records, results, strict=True):
            if isinstance(outcome, BaseException):
                log.warning(
                    "event.publish_failed", file_id=record.file_id, error=repr(outcome)
                )
                metrics.WORKER.error("event_publish_failed")
            else:
                sent.append(record.file_id)
        if sent:
            # On the staging thread: a second thread writing the same SQLite
            # file makes staging wait in SQLite's busy handler, which sleeps.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                self._stage_pool, self.catalog.mark_events_sent, sent
            )

    async def _publish_event(self, channel: aiormq.Channel, record: FileRecord) -> None:
        message = aio_pika.Message(
            msgspec.json.encode(file_event(record)),
            content_type=wire.JSON_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"{record.file_id}:{record.state}",
        )
        await publish_small(
            channel,
            message,
            exchange=topology.EVENT_EXCHANGE,
            routing_key=f"file.{record.state}.{record.type}",
            timeout=self.settings.confirm_timeout,
        )

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        message = delivery.message
        headers = dict(message.headers or {})
        await self._publish_dead(
            message.body, headers, message.content_type, delivery.queue_type, reason
        )

    async def _dead_letter_packet(
        self, delivery: Delivery, packet: Packet, reason: str
    ) -> None:
        await self._publish_dead(
            packet.data,
            wire.packet_headers(packet),
            wire.RAW_CONTENT_TYPE,
            delivery.queue_type,
            reason,
        )

    async def _publish_dead(
        self,
        body: bytes,
        headers: dict[str, Any],
        content_type: str | None,
        queue_type: str,
        reason: str,
    ) -> None:
        exchange = self._dead
        if exchange is None:
            raise BrokerError("no channel to the dead-letter exchange")
        headers.update(
            {
                "dh-dead-reason": reason,
                "dh-dead-queue": topology.queue_for(queue_type),
                "dh-dead-at": time.time(),
            }
        )
        await exchange.publish(
            aio_pika.Message(
                body,
                headers=headers,
                content_type=content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="",
            timeout=self.settings.confirm_timeout,
        )
        self.stats["dead"] += 1
        metrics.WORKER.record_dead_letter(body)
        log.warning(
            "packet.dead_lettered",
            reason=reason,
            file_id=headers.get("dh-file-id"),
            seq=headers.get("dh-seq"),
        )

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep()
            except STORAGE_FAILURES as exc:
                log.error("worker.sweep_failed", error=repr(exc))
                metrics.WORKER.error("sweep_failed")

    async def sweep(self) -> None:
        """Finish what crashed workers left, expire stale files, resend events."""
        loop = asyncio.get_running_loop()
        now = time.time()
        due = await loop.run_in_executor(
            self._stage_pool, self.catalog.due_for_finalize, now
        )
        for file_id in due:
            self.schedule_finalize(file_id)

        expired = await loop.run_in_executor(
            self._stage_pool, self.assembler.expire, now - self.settings.expire_after
        )
        metrics.WORKER.files_expired.inc(len(expired))
        for file_id in expired:
            log.warning("file.expired", file_id=file_id)

        unsent = await loop.run_in_executor(
            self._stage_pool, self.catalog.events_unsent, now - 30.0
        )
        if unsent:
            await self._announce(unsent)

        await loop.run_in_executor(self._stage_pool, self.assembler.sweep_staging)


def _enqueue(inbox: asyncio.Queue[Delivery], data_type: str) -> Any:
    async def on_message(message: AbstractIncomingMessage) -> None:
        inbox.put_nowait(Delivery(data_type, message))

    return on_message


async def _settle(action: Any) -> None:
    """Ack or nack; on a closed channel the broker redelivers anyway."""
    try:
        await action
    except BROKER_FAILURES as exc:
        log.debug("delivery.settle_failed", error=repr(exc))


def file_event(record: FileRecord) -> dict[str, Any]:
    return {
        "event": f"file.{record.state}",
        "file_id": record.file_id,
        "type": record.type,
        "state": record.state,
        "size": record.size,
        "sha256": record.sha256,
        "location": record.location,
        "file_name": record.file_name,
        "device_id": record.device_id,
        "metadata": record.metadata,
        "error": record.error,
        "stored_at": record.stored_at,
    }
