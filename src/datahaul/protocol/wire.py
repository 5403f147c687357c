"""How packets travel in AMQP messages (see docs/protocol.md).

Three forms reach a queue:

- a single packet: the raw chunk as the body, every other field in `dh-*`
  headers (what the gateway publishes for large chunks);
- a bundle: many small packets of one type in one message, each a frame of
  lengths, a JSON header and the raw chunk (what the gateway publishes for
  small packets, so that the broker's per-message cost is paid once);
- the design note's JSON body, published by another program, whose type
  follows from the queue when it is missing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from datahaul.errors import PacketError
from datahaul.protocol.packet import (
    OPTIONAL_TEXT_FIELDS,
    Packet,
    check_all,
    convert,
)

HEADER_PREFIX = "dh-"
RAW_CONTENT_TYPE = "application/octet-stream"
BUNDLE_CONTENT_TYPE = "application/vnd.datahaul.bundle"
JSON_CONTENT_TYPE = "application/json"

_FRAME_LENGTHS = struct.Struct(">II")
_json_encoder = msgspec.json.Encoder()
_frame_header_decoder = msgspec.json.Decoder(Packet)


def packet_headers(packet: Packet) -> dict[str, Any]:
    """The AMQP headers that carry every field of a packet but its data."""
    headers: dict[str, Any] = {
        "dh-type": packet.type,
        "dh-file-id": packet.file_id,
        "dh-seq": packet.seq,
        "dh-total-seq": packet.total_seq,
    }
    for name in OPTIONAL_TEXT_FIELDS:
        value = getattr(packet, name)
        if value is not None:
            headers[HEADER_PREFIX + name.replace("_", "-")] = value
    if packet.metadata is not None:
        headers["dh-metadata"] = _json_encoder.encode(packet.metadata).decode()
    return headers


def encode_bundle(packets: Iterable[Packet]) -> bytes:
    """Frames of (header length, data length, JSON header, data), end to end.

    A frame's header is the packet with its data left empty (`"data": ""`),
    so that a worker decodes it straight into a Packet in one call.
    """
    parts: list[bytes] = []
    for packet in packets:
        header = _json_encoder.encode(msgspec.structs.replace(packet, data=b""))
        parts.append(_FRAME_LENGTHS.pack(len(header), len(packet.data)))
        parts.append(header)
        parts.append(packet.data)
    return b"".join(parts)


def decode_message(
    body: bytes,
    headers: Mapping[str, Any] | None,
    content_type: str | None,
    queue_type: str,
    max_chunk_bytes: int,
) -> list[Packet]:
    """Every packet an AMQP message carries, checked; PacketError if unusable."""
    if headers and "dh-file-id" in headers:
        packets = [_from_headers(headers, body)]
    elif content_type == BUNDLE_CONTENT_TYPE:
        packets = decode_frames(body)
    else:
        packets = [_from_note(body, queue_type)]

    check_all(packets, max_chunk_bytes)
    for packet in packets:
        if packet.type != queue_type:
            raise PacketError(
                "type",
                f"a {packet.type} packet arrived on the {queue_type} queue; "
                "publish it with the routing key of its type",
            )
    return packets


def _from_headers(headers: Mapping[str, Any], body: bytes) -> Packet:
    values: dict[str, Any] = {}
    for key, value in headers.items():
        if not key.startswith(HEADER_PREFIX):
            continue
        name = key[len(HEADER_PREFIX) :].replace("-", "_")
        values[name] = value.decode() if isinstance(value, bytes) else value
    if isinstance(values.get("metadata"), str):
        try:
            values["metadata"] = msgspec.json.decode(values["metadata"])
        except msgspec.DecodeError:
            raise PacketError("metadata", "header is not valid JSON") from None
    values["data"] = b""
    packet = convert(values)
    packet.data = body
    return packet


def decode_frames(body: bytes) -> list[Packet]:
    """The packets of a bundle body, in order; PacketError names a bad frame."""
    view = memoryview(body)
    packets: list[Packet] = []
    offset = 0
    while offset < len(body):
        if offset + _FRAME_LENGTHS.size > len(body):
            raise PacketError("$", f"bundle is truncated at byte {offset}")
        header_len, data_len = _FRAME_LENGTHS.unpack_from(body, offset)
        offset += _FRAME_LENGTHS.size
        end = offset + header_len + data_len
        if end > len(body):
            raise PacketError("$", f"bundle frame at byte {offset} runs past the end")
        packet = _frame_header(view[offset : offset + header_len], len(packets))
        packet.data = bytes(view[offset + header_len : end])
        packets.append(packet)
        offset = end
    return packets


def _frame_header(header: memoryview, index: int) -> Packet:
    try:
        packet = _frame_header_decoder.decode(header)
    except msgspec.DecodeError:
        # Not a packet as it stands: a frame from a gateway before 2026-12-04
        # (no "data" key, and still in an outbox or a queue), or a broken one,
        # whose error then names the field.
        pass
    else:
        if not packet.data:
            return packet
    try:
        values = msgspec.json.decode(header)
    except msgspec.DecodeError:
        raise PacketError("$", "bundle frame header is not valid JSON") from None
    if not isinstance(values, dict):
        raise PacketError("$", "bundle frame header is not a JSON object")
    values["data"] = b""
    return convert(values, index=index)


def _from_note(body: bytes, queue_type: str) -> Packet:
    try:
        values = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise PacketError(
            "$", "message is neither a datahaul packet nor a JSON packet body"
        ) from None
    if not isinstance(values, dict):
        raise PacketError("$", "a JSON packet body must be an object")
    if values.get("type") is None:
        values["type"] = queue_type
    return convert(values)
