"""The robot side of datahaul: cut files into packets and send them to a gateway."""

from datahaul.sender.chunking import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    ChunkPlan,
    content_id,
    default_file_id,
    guess_content_type,
    infer_type,
    parse_size,
)
from datahaul.sender.client import (
    DEFAULT_CONCURRENCY,
    ProgressEvent,
    ProgressHook,
    Sender,
    SendResult,
)
from datahaul.sender.errors import (
    FileChanged,
    GatewayRejected,
    GatewayUnavailable,
    ResumeConflict,
    SendError,
)
from datahaul.sender.retry import RetryPolicy

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CONCURRENCY",
    "MAX_CHUNK_SIZE",
    "ChunkPlan",
    "FileChanged",
    "GatewayRejected",
    "GatewayUnavailable",
    "ProgressEvent",
    "ProgressHook",
    "ResumeConflict",
    "RetryPolicy",
    "SendError",
    "SendResult",
    "Sender",
    "content_id",
    "default_file_id",
    "guess_content_type",
    "infer_type",
    "parse_size",
]
