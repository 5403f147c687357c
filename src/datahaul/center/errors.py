"""The center API's refusals: an HTTP status and JSON that names what was wrong."""

from __future__ import annotations

from datahaul.errors import DatahaulError


class ApiError(DatahaulError):
    """Raised by a center handler to refuse a request; `field` names the culprit."""

    def __init__(
        self,
        status: int,
        error: str,
        field: str,
        reason: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.error = error
        self.field = field
        self.reason = reason
        self.headers = headers or {}
        super().__init__(f"{field}: {reason}")

    def to_json(self) -> dict[str, object]:
        return {"error": self.error, "field": self.field, "reason": self.reason}


def bad_parameter(name: str, reason: str) -> ApiError:
    return ApiError(400, "BadParameter", name, reason)


def no_such_file(file_id: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        "file_id",
        f"the catalog has no file {file_id!r}; list files at /v1/files, or wait "
        "for its first packet to reach a worker",
    )
