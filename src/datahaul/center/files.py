"""The file API under /v1/files: find files, look at one, download it."""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from datahaul import metrics
from datahaul.center.content import (
    Content,
    byte_range,
    content_type,
    disposition,
    etag,
    locate,
)
from datahaul.center.errors import ApiError, bad_parameter, no_such_file
from datahaul.center.service import Center
from datahaul.protocol.packet import DATA_TYPES
from datahaul.storage.catalog import (
    ASSEMBLING,
    EXPIRED,
    FAILED,
    RECEIVING,
    STORED,
    Catalog,
    FileRecord,
    missing_ranges,
)

CENTER_KEY = web.AppKey("center", Center)
STATES = (RECEIVING, ASSEMBLING, STORED, FAILED, EXPIRED)
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
LIST_PARAMETERS = ("type", "device", "state", "since", "until", "limit", "offset")


@dataclass
class FileQuery:
    type: str | None = None
    state: str | None = None
    device_id: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0


def register(app: web.Application) -> None:
    app.router.add_get("/v1/files", list_files, name="files")
    app.router.add_get("/v1/files/{file_id}", file_detail, name="file")
    app.router.add_get("/v1/files/{file_id}/content", file_content, name="content")
    app.router.add_get("/v1/files/{file_id}/text", file_text, name="text")


async def list_files(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    query = parse_query(request.query)

    # One more row than asked tells whether another page follows.
    records = await center.on_catalog(_page, center.catalog, query)
    more = len(records) > query.limit
    records = records[: query.limit]
    following = None
    if more:
        following = _page_link(request.query, query.offset + query.limit)
    return web.json_response(
        {
            "files": [file_json(r) for r in records],
            "limit": query.limit,
            "offset": query.offset,
            "next": following,
        }
    )


async def file_detail(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    file_id = request.match_info["file_id"]
    details = await center.on_catalog(_details, center.catalog, file_id)
    if details is None:
        raise no_such_file(file_id)
    return web.json_response(details)


async def file_content(request: web.Request) -> web.StreamResponse:
    return await _serve(request, as_text=False)


async def file_text(request: web.Request) -> web.StreamResponse:
    return await _serve(request, as_text=True)


def parse_query(params: Mapping[str, str]) -> FileQuery:
    """Check and convert /v1/files parameters; ApiError names a bad one."""
    for name in params:
        if name not in LIST_PARAMETERS:
            raise bad_parameter(
                name, f"unknown parameter; use {', '.join(LIST_PARAMETERS)}"
            )
    query = FileQuery(
        type=_choice(params, "type", DATA_TYPES),
        state=_choice(params, "state", STATES),
        device_id=params.get("device") or None,
        since=_moment(params, "since"),
        until=_moment(params, "until"),
        limit=_integer(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        offset=_integer(params, "offset", 0, 0, None),
    )
    if (
        query.since is not None
        and query.until is not None
        and query.since > query.until
    ):
        raise bad_parameter("until", "until lies before since; swap them")
    return query


def parse_moment(raw: str) -> float:
    """Seconds since the epoch from ISO 8601 (UTC unless it says) or a number."""
    try:
        value = float(raw)
    except ValueError:
        moment = datetime.datetime.fromisoformat(raw.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"{raw!r} is not a finite number")
    return value


def iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def file_json(record: FileRecord) -> dict[str, Any]:
    """A file as the API shows it: catalog fields, ISO times, links."""
    body = record.to_json()
    for name in ("created_at", "updated_at", "stored_at"):
        body[name] = iso(body[name])
    body["packets"] = {"received": record.received, "total": record.total_seq}
    base = f"/v1/files/{record.file_id}"
    body["links"] = {"self": base}
    if record.state == STORED:
        body["links"]["content"] = base + "/content"
        if record.type == "text":
            body["links"]["text"] = base + "/text"
    return body


def _page(catalog: Catalog, query: FileQuery) -> list[FileRecord]:
    return catalog.list_files(
        type=query.type,
        state=query.state,
        device_id=query.device_id,
        since=query.since,
        until=query.until,
        limit=query.limit + 1,
        offset=query.offset,
    )


def _details(catalog: Catalog, file_id: str) -> dict[str, Any] | None:
    record = catalog.get(file_id)
    if record is None:
        return None
    body = file_json(record)
    body["missing"] = (
        missing_ranges(catalog.received_seqs(file_id), record.total_seq)
        if record.state == RECEIVING
        else []
    )
    return body


def _page_link(params: Mapping[str, str], offset: int) -> str:
    kept = {k: v for k, v in params.items() if k != "offset"}
    return "/v1/files?" + urlencode({**kept, "offset": offset})


def _choice(
    params: Mapping[str, str], name: str, allowed: tuple[str, ...]
) -> str | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if raw not in allowed:
        raise bad_parameter(name, f"{raw!r} is not one of {', '.join(allowed)}")
    return raw


def _moment(params: Mapping[str, str], name: str) -> float | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return parse_moment(raw)
    except ValueError:
        raise bad_parameter(
            name,
            f"{raw!r} is neither ISO 8601 (2024-05-01T12:00:00Z) nor seconds "
            "since the epoch",
        ) from None


def _integer(
    params: Mapping[str, str], name: str, default: int, low: int, high: int | None
) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_parameter(name, f"{raw!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f"{low} or more"
        raise bad_parameter(name, f"{value} is outside {bounds}")
    return value


async def _serve(request: web.Request, *, as_text: bool) -> web.StreamResponse:
    center = request.app[CENTER_KEY]
    file_id = request.match_info["file_id"]
    record = await center.on_catalog(center.catalog.get, file_id)
    if record is None:
        raise no_such_file(file_id)
    _check_servable(record, as_text)
    content: Content = await center.on_catalog(
        locate, center.catalog, center.store, record
    )

    wanted = _wanted_range(request, record, content.size)
    start, end = wanted if wanted is not None else (0, content.size)
    response = web.StreamResponse(status=206 if wanted is not None else 200)
    response.headers["Content-Type"] = content_type(record, as_text)
    response.content_length = end - start
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["Content-Disposition"] = disposition(
        record, "inline" if as_text else "attachment"
    )
    tag = etag(record)
    if tag:
        response.headers["ETag"] = tag
    if wanted is not None:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{content.size}"
    await response.prepare(request)

    if request.method != "HEAD" and end > start:
        await _send(center, response, content.read(start, end))
    await response.write_eof()
    return response


def _check_servable(record: FileRecord, as_text: bool) -> None:
    if record.state != STORED:
        progress = (
            f" ({record.received} of {record.total_seq} packets)"
            if record.state == RECEIVING
            else ""
        )
        raise ApiError(
            409,
            "NotStored",
            "file_id",
            f"file {record.file_id} is {record.state}{progress}; its content can "
            "be read once it is stored (see its state at /v1/files/"
            f"{record.file_id})",
        )
    if as_text and record.type != "text":
        raise ApiError(
            409,
            "NotText",
            "file_id",
            f"file {record.file_id} is an {record.type} file, not text; download "
            f"it from /v1/files/{record.file_id}/content",
        )


def _wanted_range(
    request: web.Request, record: FileRecord, size: int
) -> tuple[int, int] | None:
    if_range = request.headers.get("If-Range")
    # A client resuming a download of another version gets the whole file.
    if if_range is not None and if_range != etag(record):
        return None
    return byte_range(request.headers.get("Range"), size)


async def _send(
    center: Center, response: web.StreamResponse, blocks: Iterator[bytes]
) -> None:
    try:
        while True:
            block = await center.on_reader(next, blocks, None)
            if block is None:
                return
            await response.write(block)
            metrics.CENTER.bytes_served.inc(len(block))
    finally:
        # Closing the reader closes its file, on the thread that opened it.
        close = getattr(blocks, "close", None)
        if close is not None:
            await center.on_reader(close)
