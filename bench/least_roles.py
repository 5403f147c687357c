"""The three processes of the least pipeline (bench/least.py), one per role.

`python -m bench.least_roles robot|relay|store ...`. Each does only what a
pipeline of datahaul's shape cannot leave out, with the cheapest calls
Python has: no HTTP, no JSON, no catalog, no outbox. The robot imports
nothing heavy, so that its start-up is not what the figure measures.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import xxhash

# A frame on the robot's connection: payload length, the payload's XXH128.
FRAME = struct.Struct(">I16s")
# What the relay sends back once the broker has confirmed every chunk.
DONE = b"k"
DIRECT_ALIGN = 4096
# The store fdatasyncs and acks at most this much at once, a quarter of
# what the bare client's prefetch holds at 256 KiB, so that the broker
# keeps delivering while a batch is written.
SYNC_BYTES = 4 * 1024 * 1024


def robot(host: str, port: str, path: str, chunk: str) -> None:
    """Read the file in chunks, hash each, and stream them to the relay."""
    size = int(chunk)
    buffer = bytearray(size)
    view = memoryview(buffer)
    with (
        open(path, "rb", buffering=0) as source,
        socket.create_connection((host, int(port))) as link,
    ):
        while count := source.readinto(buffer):
            piece = view[:count]
            link.sendall(FRAME.pack(count, xxhash.xxh3_128_digest(piece)))
            link.sendall(piece)
        link.sendall(FRAME.pack(0, bytes(16)))
        if link.recv(1) != DONE:
            raise SystemExit(
                "the relay closed the connection before the broker confirmed "
                "every chunk; its own error says why"
            )


def relay(amqp_url: str, queue: str, window: str) -> None:
    """Check each chunk and publish it persistently, with confirms in flight."""
    asyncio.run(_relay(amqp_url, queue, int(window)))


async def _relay(amqp_url: str, queue: str, window: int) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    finished = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _publish_frames(reader, channel.default_exchange, queue, window)
        except BaseException as error:
            finished.set_exception(error)
            raise
        else:
            writer.write(DONE)
            await writer.drain()
            finished.set_result(None)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"ready {port}", flush=True)
    await finished
    # Stay until the harness stops it: its CPU is read while it is alive.
    await asyncio.Event().wait()


async def _publish_frames(
    reader: asyncio.StreamReader, exchange: Any, queue: str, window: int
) -> None:
    import aio_pika

    slots = asyncio.Semaphore(window)
    pending: set[asyncio.Future[Any]] = set()
    seq = 0
    while True:
        length, digest = FRAME.unpack(await reader.readexactly(FRAME.size))
        if length == 0:
            break
        data = await reader.readexactly(length)
        if xxhash.xxh3_128_digest(data) != digest:
            raise SystemExit(f"chunk {seq + 1} arrived corrupt")
        seq += 1
        await slots.acquire()
        message = aio_pika.Message(
            data,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"{seq}:{digest.hex()}",
        )
        future = asyncio.ensure_future(exchange.publish(message, queue))
        pending.add(future)
        future.add_done_callback(_settled(pending, slots))
    for result in await asyncio.gather(*pending, return_exceptions=True):
        if isinstance(result, BaseException):
            raise SystemExit(f"the broker refused a publish: {result!r}")


def _settled(
    pending: set[asyncio.Future[Any]], slots: asyncio.Semaphore
) -> Callable[[asyncio.Future[Any]], None]:
    def release(future: asyncio.Future[Any]) -> None:
        pending.discard(future)
        slots.release()

    return release


def store(amqp_url: str, queue: str, prefetch: str, path: str, chunk: str) -> None:
    """Consume, check, write durably with O_DIRECT, hash in order, then ack."""
    asyncio.run(_store(amqp_url, queue, int(prefetch), path, int(chunk)))


async def _store(
    amqp_url: str, queue: str, prefetch: int, path: str, chunk: int
) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    arrived: asyncio.Queue[Any] = asyncio.Queue()
    source_queue = await channel.get_queue(queue)

    async def on_message(message: Any) -> None:
        arrived.put_nowait(message)

    await source_queue.consume(on_message)
    print("ready", flush=True)

    image = DirectImage(path, chunk)
    try:
        while not image.complete():
            batch = [await arrived.get()]
            while not arrived.empty() and len(batch) * chunk < SYNC_BYTES:
                batch.append(arrived.get_nowait())
            await asyncio.to_thread(image.write, batch)
            await batch[-1].ack(multiple=True)
    finally:
        image.close()
    print(f"done {time.monotonic()} {image.sha256.hexdigest()}", flush=True)
    await asyncio.Event().wait()


class DirectImage:
    """The file rebuilt at `(seq - 1) * chunk`, written past the page cache.

    The harness names the file's size in DATAHAUL_LEAST_SIZE; the store is
    done once that many bytes are durable.
    """

    def __init__(self, path: str, chunk: int) -> None:
        self.chunk = chunk
        self.expected = int(os.environ["DATAHAUL_LEAST_SIZE"])
        self.received = 0
        self.sha256 = hashlib.sha256()
        self._direct = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        self._plain = os.open(path, os.O_WRONLY)
        self._buffer = mmap.mmap(-1, chunk)

    def complete(self) -> bool:
        return self.received >= self.expected

    def write(self, batch: list[Any]) -> None:
        for message in batch:
            self._write_one(message)
        os.fdatasync(self._direct)

    def _write_one(self, message: Any) -> None:
        seq_text, digest = message.message_id.split(":")
        body = message.body
        if xxhash.xxh3_128_hexdigest(body) != digest:
            raise SystemExit(f"chunk {seq_text} changed between relay and store")
        offset = (int(seq_text) - 1) * self.chunk
        aligned = len(body) - len(body) % DIRECT_ALIGN
        if aligned:
            self._buffer[:aligned] = body[:aligned]
            os.pwrite(self._direct, memoryview(self._buffer)[:aligned], offset)
        if aligned < len(body):
            os.pwrite(self._plain, body[aligned:], offset + aligned)
            os.fdatasync(self._plain)
        self.sha256.update(body)
        self.received += len(body)

    def close(self) -> None:
        os.close(self._direct)
        os.close(self._plain)
        self._buffer.close()


ROLES: dict[str, Callable[..., None]] = {"robot": robot, "relay": relay, "store": store}

if __name__ == "__main__":
    ROLES[sys.argv[1]](*sys.argv[2:])
