"""Many small packets, of one file or of many, gathered into few requests.

A dispatcher takes whatever has gathered as soon as a request slot is free, so
an idle link sends each packet at once and a busy one sends full batches: the
batch size follows the load without a timer. Producers wait while the batch
is full, which keeps memory bounded however fast the disk reads.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

AcceptHook = Callable[[int, int, bool], None]


class Settlement:
    """The answers one file's send waits for, for all of its queued packets.

    One future per file rather than one per packet: a file of a hundred small
    packets would otherwise cost a hundred futures and tasks on the sender's
    event loop, which is where its CPU went. `on_accept(packets, bytes,
    buffered)` hears each request that took some of them.
    """

    def __init__(self, on_accept: AcceptHook) -> None:
        self._on_accept = on_accept
        self._outstanding = 0
        self._sealed = False
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self.future.done()

    def expect(self, packets: int) -> None:
        self._outstanding += packets

    def accepted(self, packets: int, length: int, buffered: bool) -> None:
        if self.future.done():
            return
        self._outstanding -= packets
        self._on_accept(packets, length, buffered)
        self._resolve_if_finished()

    def failed(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    async def wait(self) -> None:
        """Wait for every packet queued so far; queue no more after calling it."""
        self._sealed = True
        self._resolve_if_finished()
        await self.future

    def abandon(self) -> None:
        """The send is over: its packets still queued need no trip."""
        if not self.future.done():
            self.future.cancel()
        elif not self.future.cancelled():
            self.future.exception()  # read, so asyncio does not warn of it

    def _resolve_if_finished(self) -> None:
        if self._sealed and self._outstanding <= 0 and not self.future.done():
            self.future.set_result(None)


@dataclass(eq=False, slots=True)
class Queued:
    """One encoded packet waiting in a batch; `length` is its payload's bytes."""

    file_id: str
    seq: int
    encoded: bytes
    length: int
    settlement: Settlement

    def fail(self, error: BaseException) -> None:
        self.settlement.failed(error)


def accept_all(items: Sequence[Queued], buffered: bool) -> None:
    """Tell each file whose packets a request carried that they were taken."""
    tallies: dict[Settlement, list[int]] = {}
    for item in items:
        tally = tallies.setdefault(item.settlement, [0, 0])
        tally[0] += 1
        tally[1] += item.length
    for settlement, (packets, length) in tallies.items():
        settlement.accepted(packets, length, buffered)


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

    async def add(self, items: Sequence[Queued]) -> None:
        """Queue packets in order, waiting whenever the batch being gathered is
        full; each counts against its file's settlement as it finds a place."""
        async with self._changed:
            for item in items:
                if not self._has_room_for(item):
                    self._changed.notify_all()
                    await self._changed.wait_for(self._room_test(item))
                self._pending.append(item)
                self._pending_bytes += len(item.encoded)
                item.settlement.expect(1)
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
            item.settlement.abandon()
        if self._posts:
            await asyncio.gather(*self._posts, return_exceptions=True)

    def _room_test(self, item: Queued) -> Callable[[], bool]:
        return lambda: self._has_room_for(item)

    def _has_room_for(self, item: Queued) -> bool:
        if not self._pending:
            return True
        if len(self._pending) >= self._max_packets:
            return False
        return self._pending_bytes + len(item.encoded) + 1 <= self._max_bytes

    def _take(self) -> list[Queued]:
        # Packets whose file already failed or was cancelled need no trip.
        batch = [item for item in self._pending if not item.settlement.done]
        self._pending = []
        self._pending_bytes = 0
        return batch


def encode_batch(items: list[Queued]) -> bytes:
    """A JSON array of already encoded packets."""
    return b"[" + b",".join(item.encoded for item in items) + b"]"


AskStatuses = Callable[[list[str]], Coroutine[Any, Any, Mapping[str, Any]]]


class StatusQuestions:
    """Files whose status at the gateway is wanted, asked about together.

    A send that resumes first asks what the gateway already has. Asked one
    file per request, a burst of small files spent more requests on that
    question than on their packets; gathered like packets, whatever waits
    goes in one request as soon as a slot is free. `ask` takes file ids
    and answers each with its status, or None for a file the gateway has
    not seen; it runs holding one slot of `slots`.
    """

    def __init__(
        self, ask: AskStatuses, slots: asyncio.Semaphore, *, max_files: int
    ) -> None:
        self._ask = ask
        self._slots = slots
        self._max_files = max_files
        self._waiting: dict[str, list[asyncio.Future[Any]]] = {}
        self._wake = asyncio.Event()
        self._asking: set[asyncio.Task[None]] = set()

    async def status(self, file_id: str) -> Any:
        """The gateway's status of one file, or None when it has none of it."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(file_id, []).append(answer)
        self._wake.set()
        return await answer

    async def run(self) -> None:
        """Ask until cancelled."""
        while True:
            await self._wake.wait()
            await self._slots.acquire()
            asked = self._take()
            if not asked:
                self._slots.release()
                continue
            task = asyncio.create_task(self._answer(asked))
            self._asking.add(task)
            task.add_done_callback(self._asking.discard)

    async def close(self) -> None:
        for task in list(self._asking):
            task.cancel()
        for answers in self._take(everything=True).values():
            for answer in answers:
                answer.cancel()
        if self._asking:
            await asyncio.gather(*self._asking, return_exceptions=True)

    def _take(
        self, *, everything: bool = False
    ) -> dict[str, list[asyncio.Future[Any]]]:
        limit = len(self._waiting) if everything else self._max_files
        asked = dict(itertools.islice(self._waiting.items(), limit))
        for file_id in asked:
            del self._waiting[file_id]
        if not self._waiting:
            self._wake.clear()
        return asked

    async def _answer(self, asked: dict[str, list[asyncio.Future[Any]]]) -> None:
        try:
            statuses = await self._ask(list(asked))
        except asyncio.CancelledError:
            for answers in asked.values():
                for answer in answers:
                    answer.cancel()
            raise
        except Exception as error:
            for answers in asked.values():
                for answer in answers:
                    if not answer.done():
                        answer.set_exception(error)
            return
        finally:
            self._slots.release()
        for file_id, answers in asked.items():
            for answer in answers:
                if not answer.done():
                    answer.set_result(statuses.get(file_id))
