"""The packet rules and the AMQP forms, without any server."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import msgspec
import pytest

from datahaul.config import Settings
from datahaul.errors import PacketError
from datahaul.gateway.service import plan_messages
from datahaul.protocol import wire
from datahaul.protocol.packet import (
    Packet,
    check,
    check_all,
    from_fields,
    shape_error,
    xxh128_of,
)
from datahaul.storage.catalog import missing_ranges


def _packet(**changes: object) -> Packet:
    fields: dict[str, object] = {
        "type": "image",
        "file_id": "abc123",
        "seq": 1,
        "total_seq": 10,
        "data": b"chunk",
    }
    fields.update(changes)
    return Packet(**fields)  # type: ignore[arg-type]


def _decode_error(body: dict[str, object]) -> PacketError:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(json.dumps(body).encode(), type=Packet | list[Packet])
    return shape_error(caught.value, None)


def test_the_design_note_packet_decodes_as_is():
    """The design note's example body is a valid packet, base64 decoded."""
    body = {
        "type": "image",
        "file_id": "abc123",
        "seq": 1,
        "total_seq": 10,
        "data": base64.b64encode(b"hello").decode(),
    }
    packet = msgspec.json.decode(json.dumps(body).encode(), type=Packet)
    assert check(packet, 1024).data == b"hello"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"file_id": "a", "seq": 1, "total_seq": 1, "data": ""}, "type"),
        ({"type": "image", "seq": 1, "total_seq": 1, "data": ""}, "file_id"),
        (
            {"type": "image", "file_id": "a", "seq": "1", "total_seq": 1, "data": ""},
            "seq",
        ),
        (
            {"type": "audio", "file_id": "a", "seq": 1, "total_seq": 1, "data": ""},
            "type",
        ),
        (
            {"type": "image", "file_id": "a", "seq": 1, "total_seq": 1, "data": "%%"},
            "data",
        ),
        (
            {
                "type": "image",
                "file_id": "a",
                "seq": 1,
                "total_seq": 1,
                "data": "",
                "colour": "red",
            },
            "colour",
        ),
    ],
)
def test_shape_errors_name_the_field(body, field):
    """Missing, wrong-typed, unknown and badly encoded fields are named."""
    assert _decode_error(body).field == field


def test_errors_in_a_batch_name_the_packet_index():
    """In an array, the error says which packet broke the rules."""
    good = {"type": "image", "file_id": "a", "seq": 1, "total_seq": 1, "data": ""}
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(
            json.dumps([good, {**good, "seq": None}]).encode(),
            type=Packet | list[Packet],
        )
    error = shape_error(caught.value, None)
    assert (error.index, error.field) == (1, "seq")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"seq": 0}, "seq"),
        ({"seq": 11}, "seq"),
        ({"total_seq": 0, "seq": 0}, "total_seq"),
        ({"file_id": "../etc/passwd"}, "file_id"),
        ({"file_id": ""}, "file_id"),
        ({"data": b"x" * 2000}, "data"),
        ({"chunk_sha256": "abc"}, "chunk_sha256"),
        ({"chunk_sha256": "0" * 64}, "chunk_sha256"),
        ({"chunk_xxh128": "abc"}, "chunk_xxh128"),
        ({"chunk_xxh128": "0" * 32}, "chunk_xxh128"),
        ({"chunk_xxh128": "0" * 64}, "chunk_xxh128"),
    ],
)
def test_rule_breaking_packets_are_refused_naming_the_field(changes, field):
    """seq outside 1..total_seq, unsafe ids, oversized chunks and bad checksums
    are refused with the field named."""
    with pytest.raises(PacketError) as caught:
        check(_packet(**changes), max_chunk_bytes=1024)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        ({"file_sha256": "F" * 64}, "file_sha256", "lowercase"),
        ({"file_xxh128": "0" * 31}, "file_xxh128", "32 lowercase"),
        ({"file_xxh128": "G" * 32}, "file_xxh128", "32 lowercase"),
        ({"chunk_sha256": "abc"}, "chunk_sha256", "lowercase"),
        ({"chunk_sha256": "0" * 64}, "chunk_sha256", "does not match"),
        ({"chunk_xxh128": "A" * 32}, "chunk_xxh128", "32 lowercase"),
        ({"chunk_xxh128": "0" * 32}, "chunk_xxh128", "does not match"),
        ({"seq": 11}, "seq", "1..10"),
    ],
)
def test_a_batch_check_finds_the_packet_that_breaks_a_rule(bad, field, reason):
    """Fields checked once per file still catch a later packet of that file
    that differs; the error says which packet."""
    digest = hashlib.sha256(b"whole file").hexdigest()
    good = [_packet(seq=seq, file_sha256=digest) for seq in (1, 2)]
    batch = [*good, _packet(**{"seq": 3, "file_sha256": digest, **bad})]
    with pytest.raises(PacketError) as caught:
        check_all(batch, max_chunk_bytes=1024)
    assert (caught.value.field, caught.value.index) == (field, 2)
    assert reason in caught.value.reason
    check_all(good, max_chunk_bytes=1024)


def test_a_matching_chunk_checksum_passes():
    """A chunk whose SHA-256 or XXH128 matches its data is accepted."""
    packet = _packet(chunk_sha256=hashlib.sha256(b"chunk").hexdigest())
    assert check(packet, 1024) is packet
    packet = _packet(chunk_xxh128=xxh128_of(b"chunk"))
    assert check(packet, 1024) is packet


def test_xxh128_is_the_canonical_form_other_tools_print():
    """The digest is XXH3's 128 bits, seed 0, big-endian hex: the reference
    value for empty input, so a robot's own xxHash library agrees."""
    assert xxh128_of(b"") == "99aa06d3014798d86001c324468d497f"


def test_both_chunk_checksums_are_checked_when_both_come():
    """A packet that carries both digests is refused if either is wrong."""
    data = _packet().data
    right_sha256 = hashlib.sha256(data).hexdigest()
    with pytest.raises(PacketError) as caught:
        check(_packet(chunk_xxh128="0" * 32, chunk_sha256=right_sha256), 1024)
    assert caught.value.field == "chunk_xxh128"
    with pytest.raises(PacketError) as caught:
        check(_packet(chunk_xxh128=xxh128_of(data), chunk_sha256="0" * 64), 1024)
    assert caught.value.field == "chunk_sha256"


def test_raw_upload_fields_build_a_packet():
    """Header and query fields of a raw PUT become a packet, ints parsed."""
    packet = from_fields(
        {
            "type": "video",
            "file_id": "v1",
            "seq": "2",
            "total_seq": "3",
            "metadata": '{"lane": 2}',
        },
        b"raw",
    )
    assert (packet.seq, packet.total_seq, packet.metadata) == (2, 3, {"lane": 2})
    with pytest.raises(PacketError) as caught:
        from_fields(
            {"type": "video", "file_id": "v1", "seq": "two", "total_seq": "3"}, b""
        )
    assert caught.value.field == "seq"


def test_single_and_bundle_messages_round_trip():
    """What the gateway publishes decodes to the same packets on the worker."""
    settings = Settings.load()
    packets = [
        _packet(seq=i, data=bytes([i]) * 100, metadata={"i": i}) for i in range(1, 6)
    ]
    packets.append(
        _packet(
            seq=6,
            data=b"v" * settings.bundle_bytes,
            file_xxh128="ab" * 16,
            file_sha256="cd" * 32,
        )
    )
    messages = plan_messages(packets, settings)

    assert [m.content_type for m in messages] == [
        wire.RAW_CONTENT_TYPE,
        wire.BUNDLE_CONTENT_TYPE,
    ]
    decoded = []
    for message in messages:
        decoded += wire.decode_message(
            message.body, message.headers, message.content_type, "image", 1 << 20
        )
    assert sorted(decoded, key=lambda p: p.seq) == packets


def test_a_packet_on_the_wrong_queue_is_refused():
    """A video packet published to the image queue cannot be used there."""
    packet = _packet(type="video")
    with pytest.raises(PacketError) as caught:
        wire.decode_message(
            packet.data,
            wire.packet_headers(packet),
            wire.RAW_CONTENT_TYPE,
            "image",
            1024,
        )
    assert caught.value.field == "type"


def test_a_truncated_bundle_is_refused():
    """A bundle cut short is an error, not a shorter list of packets."""
    body = wire.encode_bundle([_packet(), _packet(seq=2)])
    with pytest.raises(PacketError, match=r"runs past the end|truncated"):
        wire.decode_message(body[:-3], {}, wire.BUNDLE_CONTENT_TYPE, "image", 1024)


def _frames(*headers: dict[str, object], data: bytes = b"chunk") -> bytes:
    body = b""
    for header in headers:
        encoded = json.dumps(header).encode()
        body += struct.pack(">II", len(encoded), len(data)) + encoded + data
    return body


def test_bundles_framed_before_the_empty_data_field_still_decode():
    """Frames whose header has no "data" key (outboxes and queues filled by a
    gateway before 2026-12-04) decode as before."""
    fields = {"type": "image", "file_id": "old-1", "total_seq": 2}
    body = _frames({**fields, "seq": 1}, {**fields, "seq": 2})
    decoded = wire.decode_message(body, {}, wire.BUNDLE_CONTENT_TYPE, "image", 1024)
    assert [(p.file_id, p.seq, p.data) for p in decoded] == [
        ("old-1", 1, b"chunk"),
        ("old-1", 2, b"chunk"),
    ]


def test_a_bad_frame_header_names_its_field_and_frame():
    """A frame whose header breaks the protocol is refused naming the field."""
    good = {"type": "image", "file_id": "f1", "seq": 1, "total_seq": 2, "data": ""}
    bad = {**good, "seq": "two"}
    body = _frames(good, bad)
    with pytest.raises(PacketError) as caught:
        wire.decode_message(body, {}, wire.BUNDLE_CONTENT_TYPE, "image", 1024)
    assert (caught.value.field, caught.value.index) == ("seq", 1)
    with pytest.raises(PacketError, match="not valid JSON"):
        wire.decode_message(
            struct.pack(">II", 3, 0) + b"{x}", {}, wire.BUNDLE_CONTENT_TYPE, "image", 1
        )


def test_design_note_json_takes_its_type_from_the_queue():
    """A JSON body without `type` is a packet of its queue's type."""
    body = json.dumps(
        {
            "file_id": "n1",
            "seq": 1,
            "total_seq": 1,
            "data": base64.b64encode(b"x").decode(),
        }
    ).encode()
    [packet] = wire.decode_message(body, None, "application/json", "video", 1024)
    assert packet.type == "video"


def test_missing_ranges_are_the_gaps():
    """Missing seqs are reported as inclusive ranges."""
    assert missing_ranges([2, 3, 7], 9) == [[1, 1], [4, 6], [8, 9]]
    assert missing_ranges([1, 2, 3], 3) == []
    assert missing_ranges([], 2) == [[1, 2]]
