"""The packet: the unit a robot sends, the gateway publishes and a worker stages."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import msgspec
import xxhash

from datahaul.errors import PacketError

DataType = Literal["text", "image", "video"]
DATA_TYPES: tuple[str, ...] = get_args(DataType)

FILE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
XXH128_PATTERN = re.compile(r"^[0-9a-f]{32}$")
HEX_PATTERN = re.compile(r"[0-9a-f]+")

# The optional fields, in the order the protocol document lists them.
OPTIONAL_TEXT_FIELDS = (
    "file_name",
    "content_type",
    "device_id",
    "chunk_xxh128",
    "chunk_sha256",
    "file_xxh128",
    "file_sha256",
)


class Packet(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One chunk of one file, with what is needed to put the file together."""

    type: DataType
    file_id: str
    seq: int
    total_seq: int
    data: bytes
    file_name: str | None = None
    content_type: str | None = None
    device_id: str | None = None
    chunk_xxh128: str | None = None
    chunk_sha256: str | None = None
    file_xxh128: str | None = None
    file_sha256: str | None = None
    metadata: dict[str, Any] | None = None


def check(packet: Packet, max_chunk_bytes: int) -> Packet:
    """Raise PacketError naming the first field that breaks the protocol."""
    _check_file_fields(packet)
    _check_chunk(packet, max_chunk_bytes)
    return packet


def check_all(packets: Sequence[Packet], max_chunk_bytes: int) -> None:
    """`check` every packet; the fields a file's packets share are checked
    once per file, as a batch of small packets mostly repeats them.

    When there are several, the PacketError raised carries the packet's
    place in `packets` as its `index`.
    """
    checked: set[tuple[str, str | None, str | None]] = set()
    for index, packet in enumerate(packets):
        try:
            shared = (packet.file_id, packet.file_xxh128, packet.file_sha256)
            if shared not in checked:
                _check_file_fields(packet)
                checked.add(shared)
            _check_chunk(packet, max_chunk_bytes)
        except PacketError as exc:
            exc.index = index if len(packets) > 1 else None
            raise


def _check_file_fields(packet: Packet) -> None:
    if not FILE_ID_PATTERN.match(packet.file_id):
        raise PacketError(
            "file_id",
            "must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    if packet.file_xxh128 is not None and not XXH128_PATTERN.match(packet.file_xxh128):
        raise PacketError("file_xxh128", "must be 32 lowercase hexadecimal digits")
    if packet.file_sha256 is not None and not SHA256_PATTERN.match(packet.file_sha256):
        raise PacketError("file_sha256", "must be 64 lowercase hexadecimal digits")


def _check_chunk(packet: Packet, max_chunk_bytes: int) -> None:
    if packet.total_seq < 1:
        raise PacketError("total_seq", f"must be at least 1, got {packet.total_seq}")
    if not 1 <= packet.seq <= packet.total_seq:
        raise PacketError(
            "seq", f"must be within 1..{packet.total_seq}, got {packet.seq}"
        )
    if len(packet.data) > max_chunk_bytes:
        raise PacketError(
            "data",
            f"chunk of {len(packet.data)} bytes is over the limit of "
            f"{max_chunk_bytes} bytes; split the file into smaller packets",
        )
    for check in CHUNK_CHECKS:
        claimed = getattr(packet, check.field)
        if claimed is not None:
            check.verify(claimed, packet.data)


def xxh128_of(data: bytes) -> str:
    """A chunk's XXH128 (XXH3, 128 bits, seed 0) as `xxhsum -H2` prints it."""
    return xxhash.xxh3_128_hexdigest(data)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ChunkCheck:
    """A digest a packet may carry for its chunk, checked wherever it arrives."""

    field: str
    algorithm: str
    hex_digits: int
    digest: Callable[[bytes], str]

    def verify(self, claimed: str, data: bytes) -> None:
        actual = self.digest(data)
        if actual == claimed:
            return
        # A value equal to the data's digest is well formed: only a mismatch
        # needs the pattern, to say which of the two went wrong.
        if len(claimed) != self.hex_digits or not HEX_PATTERN.fullmatch(claimed):
            raise PacketError(
                self.field, f"must be {self.hex_digits} lowercase hexadecimal digits"
            )
        raise PacketError(
            self.field,
            f"does not match the data (its {self.algorithm} is {actual}); "
            "the chunk was corrupted on the way, send it again",
        )


# XXH128 guards a chunk against corruption on the way for a fourteenth of
# SHA-256's CPU (28 against 2 GB/s on the benchmark machine); the file's
# SHA-256, checked once it is assembled, stays the end-to-end proof.
# Clients that send a chunk's SHA-256 instead get it checked as before.
CHUNK_CHECKS = (
    ChunkCheck("chunk_xxh128", "XXH128", 32, xxh128_of),
    ChunkCheck("chunk_sha256", "SHA-256", 64, _sha256_hex),
)


def from_fields(fields: Mapping[str, str], data: bytes) -> Packet:
    """Build a packet from string fields (HTTP headers, a query) and raw bytes."""
    values: dict[str, Any] = {"data": b""}
    for name in ("type", "file_id", *OPTIONAL_TEXT_FIELDS):
        if name in fields:
            values[name] = fields[name]
    for name in ("seq", "total_seq"):
        if name in fields:
            values[name] = _parse_int(name, fields[name])
    if "metadata" in fields:
        try:
            values["metadata"] = msgspec.json.decode(fields["metadata"])
        except msgspec.DecodeError as exc:
            raise PacketError("metadata", f"is not valid JSON: {exc}") from None
    packet = convert(values)
    packet.data = data
    return packet


def convert(values: Mapping[str, Any], index: int | None = None) -> Packet:
    """Validate a mapping's shape into a Packet, naming the field on error."""
    try:
        return msgspec.convert(values, Packet)
    except msgspec.ValidationError as exc:
        raise shape_error(exc, index) from None


def shape_error(exc: msgspec.ValidationError, index: int | None) -> PacketError:
    """Turn msgspec's message ("... - at `$[2].seq`") into a named PacketError."""
    reason, _, where = str(exc).rpartition(" - at `")
    if not reason:
        reason, where = str(exc), "$`"
    path = where.rstrip("`")
    position = re.match(r"^\$\[(\d+)\]", path)
    if position:
        index = int(position.group(1))
    field = re.sub(r"^\$(\[\d+\])?\.?", "", path)
    named = re.search(r"field `([^`]+)`", reason)
    if not field and named:
        field = named.group(1)
    if field == "data" and "base64" in reason:
        reason = "is not valid base64"
    return PacketError(field or "$", reason, index=index)


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PacketError(name, f"must be an integer, got {text!r}") from None
