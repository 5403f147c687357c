"""The gateway's ledger: a file's shape holds across restarts of the gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from datahaul.errors import PacketConflict
from datahaul.gateway.ledger import Ledger
from datahaul.protocol.packet import Packet


def packet(seq: int, total_seq: int, type: str = "text") -> Packet:
    return Packet(type=type, file_id="f1", seq=seq, total_seq=total_seq, data=b"x")


async def test_a_restarted_gateway_still_refuses_a_packet_that_contradicts_its_file(
    tmp_path: Path,
) -> None:
    """The shape comes from the ledger's file when memory has none of it."""
    before = Ledger(tmp_path / "ledger.db", remembered_files=10)
    before.check([packet(1, 4)])
    before.record([packet(1, 4)])
    await before.close()

    after = Ledger(tmp_path / "ledger.db", remembered_files=10)
    try:
        with pytest.raises(PacketConflict, match="total_seq 4"):
            after.check([packet(2, 9)])
        with pytest.raises(PacketConflict, match="sent as text"):
            after.check([packet(2, 4, type="image")])
        after.check([packet(2, 4)])
    finally:
        await after.close()


async def test_a_status_question_sees_notes_still_gathering(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db", remembered_files=10)
    try:
        ledger.record([packet(1, 4), packet(3, 4)])

        status = await ledger.status("f1")
    finally:
        await ledger.close()

    assert status is not None
    assert (status["received"], status["missing"]) == (2, [[2, 2], [4, 4]])
