"""Many small packets, of one file or of many, gathered into few requests.

A dispatcher takes whatever has gathered as soon as a request slot is free, so
an idle link sends each packet at once and a busy one sends full batches: the
batch size follows the load without a timer. Producers wait while the batch
is full, which keeps memory bounded however fast the disk reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Queued:
    """One packet waiting in a batch, and the future its file's send awaits."""

    file_id: str
    seq: int
    encoded: bytes
    future: asyncio.Future[bool] = field(repr=False)

    def succeed(self, buffered: bool) -> None:
        if not self.future.done():
            self.future.set_result(buffered)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


PostBatch = Callable[[list[Queued]], Coroutine[Any, Any, None]]


class Batcher:
    """Gathers queued packets and hands full or waiting batches to `post`.

    `post` runs in its own task holding one slot of `slots`, which it must
    release when done; that is what bounds the requests in flight.
    """

    def __init__(
        self,
        post: PostBatch,
        slots: asyncio.Semaphore,
        *,
        max_bytes: int,
        max_packets: int,
    ) -> None:
        self._post = post
        self._slots = slots
        self._max_bytes = max_bytes
        self._max_packets = max_packets
        self._pending: list[Queued] = []
        self._pending_bytes = 0
        self._changed = asyncio.Condition()
        self._posts: set[asyncio.Task[None]] = set()

    async def add(self, item: Queued) -> None:
        """Queue a packet, waiting while the batch being gathered is full."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._has_room_for(item))
            self._pending.append(item)
            self._pending_bytes += len(item.encoded)
            self._changed.notify_all()

    async def run(self) -> None:
        """Dispatch batches until cancelled."""
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._pending))
            await self._slots.acquire()
            async with self._changed:
                batch = self._take()
                self._changed.notify_all()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._post(batch))
            self._posts.add(task)
            task.add_done_callback(self._posts.discard)

    async def close(self) -> None:
        """Cancel the batches still travelling; their files' sends see it."""
        for task in list(self._posts):
            task.cancel()
        for item in self._take():
            item.future.cancel()
        if self._posts:
            await asyncio.gather(*self._posts, return_exceptions=True)

    def _has_room_for(self, item: Queued) -> bool:
        if not self._pending:
            return True
        if len(self._pending) >= self._max_packets:
            return False
        return self._pending_bytes + len(item.encoded) + 1 <= self._max_bytes

    def _take(self) -> list[Queued]:
        # Packets whose file already failed or was cancelled need no trip.
        batch = [item for item in self._pending if not item.future.done()]
        self._pending = []
        self._pending_bytes = 0
        return batch


def encode_batch(items: list[Queued]) -> bytes:
    """A JSON array of already encoded packets."""
    return b"[" + b",".join(item.encoded for item in items) + b"]"
