"""The gateway's HTTP API: what robots talk to on the vehicle."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
import structlog
from aiohttp import web

from datahaul import metrics
from datahaul.config import Settings
from datahaul.errors import OutboxFull, PacketConflict, PacketError
from datahaul.gateway.service import Gateway
from datahaul.protocol import wire
from datahaul.protocol.packet import (
    FILE_ID_PATTERN,
    Packet,
    check,
    check_all,
    from_fields,
    shape_error,
)

log = structlog.get_logger("datahaul.gateway")

GATEWAY_KEY = web.AppKey("gateway", Gateway)
HEADER_PREFIX = "x-datahaul-"
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")
RETRY_AFTER_SECONDS = 5
# One status question may name this many files; a sender asks for fewer.
MAX_STATUS_FILES = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_packet_decoder = msgspec.json.Decoder(Packet | list[Packet])
_line_decoder = msgspec.json.Decoder(Packet)


def create_app(settings: Settings) -> web.Application:
    # A JSON body carries base64 (4/3 of the bytes) and may hold many packets.
    app = web.Application(
        client_max_size=settings.max_chunk_bytes * 2 + 1024 * 1024,
        middlewares=[errors_as_json],
    )
    app[GATEWAY_KEY] = Gateway(settings)
    app.router.add_post("/v1/packets", post_packets)
    app.router.add_put("/v1/files/{file_id}/chunks/{seq}", put_chunk)
    app.router.add_post("/v1/chunks", post_chunks)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_post("/v1/files/status", post_file_statuses)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/status", healthz)
    metrics.expose(app, metrics.GATEWAY)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    await app[GATEWAY_KEY].start()


async def _stop(app: web.Application) -> None:
    await app[GATEWAY_KEY].close()


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal is JSON that names what was wrong and what to do."""
    gateway = request.app[GATEWAY_KEY]
    try:
        return await handler(request)
    except PacketConflict as exc:
        gateway.counters["rejected"] += 1
        metrics.GATEWAY.error("conflict")
        return web.json_response(exc.to_json(), status=409)
    except PacketError as exc:
        gateway.counters["rejected"] += 1
        metrics.GATEWAY.error("rejected")
        status = 413 if exc.field == "data" and "limit" in exc.reason else 400
        return web.json_response(exc.to_json(), status=status)
    except OutboxFull as exc:
        metrics.GATEWAY.error("outbox_full")
        return web.json_response(
            {"error": "OutboxFull", "reason": str(exc)},
            status=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    except web.HTTPRequestEntityTooLarge as exc:
        metrics.GATEWAY.error("rejected")
        return web.json_response(
            {"error": "TooLarge", "field": "$", "reason": exc.text}, status=413
        )


async def post_packets(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    body = await read_body(request)
    if request.content_type in NDJSON_TYPES:
        packets = _decode_lines(body)
    else:
        packets = _decode_json(body)
    if not packets:
        raise PacketError("$", "the request holds no packet")

    check_all(packets, gateway.settings.max_chunk_bytes)
    return await _accept(gateway, packets)


async def put_chunk(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    fields = _chunk_fields(request)
    data = await _read_limited(request, gateway.settings.max_chunk_bytes)
    packet = check(from_fields(fields, data), gateway.settings.max_chunk_bytes)
    return await _accept(gateway, [packet])


async def post_chunks(request: web.Request) -> web.Response:
    """Several raw chunks in one request, framed as a bundle (docs/protocol.md),
    published together as one broker message."""
    gateway = request.app[GATEWAY_KEY]
    if request.content_type != wire.BUNDLE_CONTENT_TYPE:
        raise PacketError(
            "$",
            f"Content-Type must be {wire.BUNDLE_CONTENT_TYPE}, not "
            f"{request.content_type}; JSON packets go to /v1/packets",
        )
    body = await read_body(request)
    packets = wire.decode_frames(body)
    if not packets:
        raise PacketError("$", "the request holds no packet")
    check_all(packets, gateway.settings.max_chunk_bytes)
    return await _accept(gateway, packets, framed=body)


async def get_file(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    file_id = request.match_info["file_id"]
    status = await gateway.ledger.status(file_id)
    if status is None:
        return web.json_response(
            {
                "error": "NotFound",
                "field": "file_id",
                "reason": f"the gateway has accepted no packet of file {file_id}",
            },
            status=404,
        )
    return web.json_response(status)


async def post_file_statuses(request: web.Request) -> web.Response:
    """What the gateway has of many files at once: one question, one answer."""
    gateway = request.app[GATEWAY_KEY]
    try:
        file_ids = _asked_file_ids(await request.read())
    except _BadQuestion as exc:
        return web.json_response(
            {"error": "BadRequest", "field": exc.field, "reason": exc.reason},
            status=400,
        )
    statuses = await gateway.ledger.statuses(file_ids)
    return web.json_response({"files": statuses})


class _BadQuestion(Exception):
    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def _asked_file_ids(body: bytes) -> list[str]:
    try:
        question = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise _BadQuestion("$", f"body is not valid JSON: {exc}") from None
    file_ids = question.get("file_ids") if isinstance(question, dict) else None
    if not isinstance(file_ids, list) or not file_ids:
        raise _BadQuestion(
            "file_ids",
            'must be a non-empty list of file ids: {"file_ids": ["...", ...]}',
        )
    if len(file_ids) > MAX_STATUS_FILES:
        raise _BadQuestion(
            "file_ids",
            f"names {len(file_ids)} files, over the limit of {MAX_STATUS_FILES}; "
            "ask in several requests",
        )
    for index, file_id in enumerate(file_ids):
        if not isinstance(file_id, str) or not FILE_ID_PATTERN.match(file_id):
            raise _BadQuestion(
                "file_ids",
                f"entry {index} ({file_id!r}) is not a file id: 1-128 letters, "
                "digits, '.', '_' or '-', starting with a letter or digit",
            )
    return file_ids


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(request.app[GATEWAY_KEY].health())


async def _accept(
    gateway: Gateway, packets: list[Packet], *, framed: bytes | None = None
) -> web.Response:
    accepted = await gateway.accept(packets, framed=framed)
    status = 202 if accepted.buffered else 200
    return web.json_response(accepted.to_json(), status=status)


def _decode_json(body: bytes) -> list[Packet]:
    try:
        decoded = _packet_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise shape_error(exc, None) from None
    except msgspec.DecodeError as exc:
        raise PacketError("$", f"body is not valid JSON: {exc}") from None
    return decoded if isinstance(decoded, list) else [decoded]


def _decode_lines(body: bytes) -> list[Packet]:
    packets = []
    for index, line in enumerate(line for line in body.splitlines() if line.strip()):
        try:
            packets.append(_line_decoder.decode(line))
        except msgspec.ValidationError as exc:
            raise shape_error(exc, index) from None
        except msgspec.DecodeError as exc:
            raise PacketError(
                "$", f"line is not valid JSON: {exc}", index=index
            ) from None
    return packets


def _chunk_fields(request: web.Request) -> dict[str, str]:
    fields: dict[str, str] = {
        "file_id": request.match_info["file_id"],
        "seq": request.match_info["seq"],
    }
    for name, value in request.query.items():
        fields[name] = value
    for name, value in request.headers.items():
        lowered = name.lower()
        if lowered.startswith(HEADER_PREFIX):
            fields[lowered[len(HEADER_PREFIX) :].replace("-", "_")] = value
    return fields


async def read_body(request: web.Request) -> bytes:
    """The whole body; 413 past the app's request size limit."""
    limit = request.client_max_size
    return await _read_up_to(
        request,
        limit,
        lambda size: web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size),
    )


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """A raw chunk's body, refused as soon as it passes the chunk limit."""
    return await _read_up_to(
        request,
        limit,
        lambda size: PacketError(
            "data",
            f"chunk of {size} bytes or more is over the limit of {limit} bytes; "
            "split the file into smaller packets",
        ),
    )


async def _read_up_to(
    request: web.Request, limit: int, refuse: Callable[[int], Exception]
) -> bytes:
    """The body, each byte copied once; `refuse(size)` is raised past `limit`.

    `request.read()` grows a bytearray as the body comes and copies it again
    at the end: at 2 MiB a request the reallocations alone were an eighth
    of the gateway's CPU. Here the pieces are kept as they arrive and
    joined once.
    """
    if request.content_length is not None and request.content_length > limit:
        raise refuse(request.content_length)
    # Without this the reader pauses the socket every 128 KiB of body.
    request.content.set_read_chunk_size(limit)
    pieces: list[bytes] = []
    size = 0
    while True:
        piece, _ = await request.content.readchunk()
        if not piece:
            if request.content.at_eof():
                break
            continue
        size += len(piece)
        if size > limit:
            raise refuse(size)
        pieces.append(piece)
    return b"".join(pieces)


def run(settings: Settings) -> None:
    """Serve until interrupted."""
    app = create_app(settings)
    log.info(
        "gateway.listening", host=settings.gateway_host, port=settings.gateway_port
    )
    web.run_app(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        print=None,
        access_log=None,
        handle_signals=True,
    )
