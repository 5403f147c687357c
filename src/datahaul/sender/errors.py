"""Why a file could not be sent, each error saying what to do about it.

DatahaulError
 +-- SendError               a file could not be sent
      +-- FileChanged        the file was written to while it was sent
      +-- ResumeConflict     the gateway knows the file id with another shape
      +-- GatewayRejected    the gateway answered 4xx: the packet is wrong
      +-- GatewayUnavailable the gateway could not be reached, retries spent
"""

from __future__ import annotations

from datahaul.errors import DatahaulError


class SendError(DatahaulError):
    """Raised when a file could not be sent; the message names it."""


class FileChanged(SendError):
    """Raised when a file's size or mtime moved between hashing and sending."""


class ResumeConflict(SendError):
    """Raised when the gateway has the file id with another type or total_seq."""


class GatewayRejected(SendError):
    """Raised when the gateway refuses a packet; retrying would not help."""

    def __init__(
        self,
        *,
        status: int,
        file_id: str,
        seq: int | None,
        field: str,
        reason: str,
    ) -> None:
        self.status = status
        self.file_id = file_id
        self.seq = seq
        self.field = field
        self.reason = reason
        where = f"file {file_id}" + (f" packet {seq}" if seq is not None else "")
        super().__init__(
            f"the gateway rejected {where} (HTTP {status}): {field}: {reason}"
        )


class GatewayUnavailable(SendError):
    """Raised when every allowed attempt to reach the gateway failed."""

    def __init__(
        self,
        *,
        url: str,
        attempts: int,
        last_problem: str,
        busy_seconds: float = 0.0,
    ) -> None:
        self.url = url
        self.attempts = attempts
        self.last_problem = last_problem
        self.busy_seconds = busy_seconds
        if last_problem.startswith(("HTTP 503", "HTTP 429")):
            advice = (
                f"it is still busy after {busy_seconds:.0f}s of waiting as it "
                "asked (its outbox may be full while its broker is down); send "
                "again later"
            )
        else:
            advice = (
                "check that `datahaul gateway` runs there and is reachable, "
                "or pass --gateway URL"
            )
        super().__init__(
            f"the gateway at {url} did not take the request after {attempts} "
            f"attempts (last: {last_problem}); {advice}"
        )
