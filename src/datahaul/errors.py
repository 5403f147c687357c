"""The errors datahaul raises, one small tree.

DatahaulError
 +-- ConfigError          a setting is missing or malformed
 +-- PacketError          a packet breaks the protocol (names the field)
 |    +-- PacketConflict  a packet contradicts earlier packets of its file
 +-- BrokerError          RabbitMQ refused or lost a publish
 +-- StorageError         the catalog or a blob store failed
 |    +-- IntegrityError  stored bytes do not match their checksum
 +-- OutboxFull           the gateway's outbox reached its disk quota

Two more live beside the code that raises them: ApiError (center/errors.py,
an HTTP refusal of the center API) and HarnessError (faults/, a fault
injection step that could not be carried out).
"""

from __future__ import annotations


class DatahaulError(Exception):
    """Base class of every error datahaul raises on purpose."""


class ConfigError(DatahaulError):
    """Raised when a setting is missing or cannot be parsed."""


class PacketError(DatahaulError):
    """Raised when a packet breaks the protocol; `field` names the culprit."""

    def __init__(self, field: str, reason: str, *, index: int | None = None) -> None:
        self.field = field
        self.reason = reason
        self.index = index
        where = f"packet {index}: " if index is not None else ""
        super().__init__(f"{where}{field}: {reason}")

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "error": type(self).__name__,
            "field": self.field,
            "reason": self.reason,
        }
        if self.index is not None:
            body["index"] = self.index
        return body


class PacketConflict(PacketError):
    """Raised when a packet's type or total_seq differs from its file's."""


class BrokerError(DatahaulError):
    """Raised when RabbitMQ nacks, returns or never confirms a publish."""


class StorageError(DatahaulError):
    """Raised when the catalog or a blob store cannot do what was asked."""


class IntegrityError(StorageError):
    """Raised when bytes do not match the checksum they were sent with."""


class OutboxFull(DatahaulError):
    """Raised when the gateway's outbox has no room left under its quota."""
