"""The gateway's outbox against the test's RabbitMQ vhost: rows forwarded are
marked, skipped and counted out at once, and deleted once the pass is over."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from datahaul.broker.publisher import ConfirmingPublisher, Outgoing
from datahaul.broker.topology import queue_for
from datahaul.config import Settings
from datahaul.errors import OutboxFull
from datahaul.faults.rabbit import queue_stats
from datahaul.gateway.outbox import Outbox
from datahaul.gateway.service import single_message
from datahaul.protocol.packet import Packet

CHUNK = 64 * 1024


def video_messages(file_id: str, count: int) -> list[Outgoing]:
    return [
        single_message(Packet("video", file_id, seq, count, os.urandom(CHUNK)))
        for seq in range(1, count + 1)
    ]


def rows_in(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


@pytest.fixture
async def publisher(amqp_url: str) -> AsyncIterator[ConfirmingPublisher]:
    started = ConfirmingPublisher(Settings.load(amqp_url=amqp_url), "test-outbox")
    await started.start()
    assert await started.wait_up(10.0)
    yield started
    await started.close()


async def test_a_pass_forwards_every_row_and_the_clean_up_deletes_them(
    tmp_path: Path, amqp_url: str, publisher: ConfirmingPublisher
) -> None:
    """Forwarded rows leave the depth at once and the table after the clean-up."""
    path = tmp_path / "outbox.db"
    outbox = Outbox(path, quota_bytes=64 * 1024 * 1024)
    await outbox.put(video_messages("drained", 40))

    await outbox._forward_pass(publisher)

    assert (outbox.packets, outbox.bytes) == (0, 0)
    assert outbox.forwarded_bytes > 40 * CHUNK
    assert rows_in(path, "forwarded") == 40
    await outbox.purge_forwarded()
    assert outbox.forwarded_bytes == 0
    assert rows_in(path, "outbox") == rows_in(path, "forwarded") == 0
    outbox.close()
    stats = await queue_stats(amqp_url, queue_for("video"))
    assert stats.messages == 40


async def test_rows_forwarded_before_a_restart_are_not_sent_again(
    tmp_path: Path, amqp_url: str, publisher: ConfirmingPublisher
) -> None:
    """A gateway stopped between forwarding and clean-up finds its marks: the
    reopened outbox counts nothing waiting, sends nothing twice, and deletes
    the rows it had forwarded."""
    path = tmp_path / "outbox.db"
    first = Outbox(path, quota_bytes=64 * 1024 * 1024)
    await first.put(video_messages("restarted", 12))
    await first._forward_pass(publisher)
    first.close()

    reopened = Outbox(path, quota_bytes=64 * 1024 * 1024)
    assert (reopened.packets, reopened.bytes) == (0, 0)
    assert reopened.forwarded_bytes > 12 * CHUNK
    forwarding = asyncio.create_task(reopened.forward_forever(publisher))
    try:
        for _ in range(100):
            if rows_in(path, "outbox") == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        forwarding.cancel()
        await asyncio.gather(forwarding, return_exceptions=True)

    assert rows_in(path, "outbox") == rows_in(path, "forwarded") == 0
    assert reopened.forwarded_bytes == 0
    reopened.close()
    stats = await queue_stats(amqp_url, queue_for("video"))
    assert stats.messages == 12


async def test_rows_forwarded_but_not_deleted_still_count_against_the_quota(
    tmp_path: Path, publisher: ConfirmingPublisher
) -> None:
    """Until the clean-up, forwarded rows still take disk: the quota counts them."""
    messages = video_messages("quota", 4)
    room = sum(len(m.body) + 256 for m in messages)
    outbox = Outbox(tmp_path / "outbox.db", quota_bytes=room)
    await outbox.put(messages)
    await outbox._forward_pass(publisher)

    with pytest.raises(OutboxFull, match="quota"):
        await outbox.put(video_messages("quota-next", 1))
    await outbox.purge_forwarded()
    await outbox.put(video_messages("quota-next", 1))
    assert outbox.packets == 1
    outbox.close()
