"""The robot side: an async Sender that moves files to a datahaul gateway.

    async with Sender("http://gateway:8080") as sender:
        result = await sender.send_file("drive-0042.mp4", device_id="robot-7")

A file is never held whole. It is read once for its XXH128 (its default id,
and the check the worker makes of the assembled file), then chunk by chunk
as packets leave. Asked to, a thread (or the early hash of `datahaul send`)
works out its SHA-256 meanwhile, for the last packet to carry. The gateway
is asked first what it already has, so a re-send moves only what is
missing.
Large chunks travel raw, consecutive ones of a file framed together up to
2 MiB a request (POST /v1/chunks); small ones are gathered, across files,
into JSON batches.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
import msgspec
import structlog

from datahaul.config import Settings
from datahaul.errors import ConfigError, DatahaulError
from datahaul.protocol import wire
from datahaul.protocol.packet import DataType, Packet, xxh128_of
from datahaul.sender.batching import (
    Batcher,
    Queued,
    Settlement,
    StatusQuestions,
    accept_all,
    encode_batch,
)
from datahaul.sender.chunking import (
    DEFAULT_CHUNK_SIZE,
    WHOLE_FILE_BYTES,
    BytesSource,
    ChunkPlan,
    ChunkSource,
    FileSource,
    KiB,
    MiB,
    PendingSha256,
    check_file_id,
    check_type,
    content_id,
    guess_content_type,
    infer_type,
    parse_size,
    seqs_in_ranges,
)
from datahaul.sender.errors import (
    GatewayRejected,
    GatewayUnavailable,
    ResumeConflict,
    SendError,
)
from datahaul.sender.retry import Outcome, RetryPolicy, classify

log = structlog.get_logger("datahaul.sender")

DEFAULT_CONCURRENCY = 16
INLINE_LIMIT = 64 * KiB
BATCH_BYTES = 512 * KiB
BATCH_PACKETS = 500
FILES_IN_FLIGHT = 64
STATUS_FILES_PER_QUESTION = 256
# aiohttp refuses header lines over 8 KiB; past this, fields go in a JSON body.
HEADER_BUDGET = 4 * KiB
SHA256_HEX_DIGITS = 64

Phase = Literal["hashing", "sending", "done", "failed"]
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class ProgressEvent:
    """A step of one file's send; `advance` is bytes newly done since the last."""

    source: str
    phase: Phase
    size: int
    advance: int = 0


ProgressHook = Callable[[ProgressEvent], None]


class FileDigests(Protocol):
    """A file's XXH128 and SHA-256, as something else is working them out."""

    @property
    def xxh128(self) -> Future[str]: ...

    @property
    def sha256(self) -> Future[str]: ...


# Given a file's (device, inode, size, mtime_ns), its digests if something
# is already working them out, else None.
KnownDigests = Callable[[tuple[int, int, int, int]], FileDigests | None]


@dataclass(frozen=True)
class SendResult:
    """What became of one file: its identity and how many packets moved."""

    source: str
    file_id: str
    file_name: str
    type: DataType
    size: int
    xxh128: str
    sha256: str | None
    total_seq: int
    packets_sent: int
    packets_skipped: int
    packets_buffered: int

    @property
    def status(self) -> str:
        """sent; buffered (the gateway holds some in its outbox); already sent."""
        if self.packets_sent == 0:
            return "already sent"
        if self.packets_buffered:
            return "buffered"
        return "sent"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file_id": self.file_id,
            "file_name": self.file_name,
            "type": self.type,
            "size": self.size,
            "xxh128": self.xxh128,
            "sha256": self.sha256,
            "total_seq": self.total_seq,
            "packets_sent": self.packets_sent,
            "packets_skipped": self.packets_skipped,
            "packets_buffered": self.packets_buffered,
            "status": self.status,
        }


@dataclass
class _FileSend:
    """One file on its way: its packets' shared fields and running counts."""

    source: str
    file_id: str
    file_name: str
    type: DataType
    content_type: str | None
    device_id: str | None
    metadata: dict[str, Any] | None
    xxh128: str
    sha256: PendingSha256 | None
    plan: ChunkPlan
    sent: int = 0
    buffered: int = 0
    # The raw fields, worked out again once the SHA-256 is known.
    _headers: tuple[str | None, dict[str, str]] | None = field(
        default=None, init=False, repr=False
    )

    @property
    def raw_fields(self) -> dict[str, str]:
        """The fields a raw PUT carries in headers, or {} when they cannot fit."""
        sha256 = self.known_sha256()
        if self._headers is None or self._headers[0] != sha256:
            self._headers = (sha256, _raw_fields(self, sha256))
        return self._headers[1]

    def packet(self, seq: int, data: bytes, chunk_xxh128: str | None = None) -> Packet:
        return Packet(
            type=self.type,
            file_id=self.file_id,
            seq=seq,
            total_seq=self.plan.total_seq,
            data=data,
            file_name=self.file_name,
            content_type=self.content_type,
            device_id=self.device_id,
            chunk_xxh128=chunk_xxh128 or xxh128_of(data),
            file_xxh128=self.xxh128,
            file_sha256=self.known_sha256(),
            metadata=self.metadata,
        )

    def known_sha256(self) -> str | None:
        return None if self.sha256 is None else self.sha256.known()


# Files up to this size are sent whole without asking what the gateway has.
RESUME_CHECK_BYTES = 64 * 1024
# Chunks from this size on are read and hashed off the event loop.
THREADED_READ_BYTES = 64 * 1024
# Small packets are read, encoded and queued in runs of about this many bytes.
RUN_BYTES = THREADED_READ_BYTES
# Consecutive large chunks of a file travel together up to this many bytes:
# one request to the gateway and one message to the broker instead of one
# each, which is most of what a 256 KiB chunk costs them. Two 1 MiB chunks
# a run instead of one took a 1 GiB video from 160 to 172 MB/s here.
LARGE_RUN_BYTES = 2 * MiB
# What one request in flight may hold on average: runs larger than this
# count as LARGE_RUN_BYTES / SLOT_BYTES requests, so that the gateway holds
# about as much as with one MiB a request.
SLOT_BYTES = 1 * MiB


class _Refused(Exception):
    """The gateway answered 4xx; carries its JSON error for the caller to name."""

    def __init__(self, status: int, answer: Mapping[str, Any]) -> None:
        self.status = status
        self.answer = answer
        super().__init__(f"HTTP {status}: {answer}")

    @property
    def index(self) -> int | None:
        index = self.answer.get("index")
        return index if isinstance(index, int) else None

    def naming(self, file_id: str, seq: int | None) -> GatewayRejected:
        return GatewayRejected(
            status=self.status,
            file_id=file_id,
            seq=seq,
            field=str(self.answer.get("field") or "request"),
            reason=str(
                self.answer.get("reason") or self.answer.get("error") or "refused"
            ),
        )


class Sender:
    """Sends files to one gateway over a pool of keep-alive connections.

    `concurrency` bounds the requests in flight (a batch of small packets, or
    a run of large chunks up to LARGE_RUN_BYTES, is one request), and runs
    of more than SLOT_BYTES to a share of it; with it, memory stays near
    concurrency x the larger of the chunk size and SLOT_BYTES, however large
    the files are. `progress`, if set, hears
    of every step of every file. With `sha256`, each file's SHA-256 is
    worked out too and sent for the worker to check beside the XXH128 (on
    the benchmark machine, 0.8 CPU seconds per GiB that the XXH128 alone
    does not cost). `known_digests`, if set, is asked for a file's digests
    before the Sender reads the file to work them out.
    """

    def __init__(
        self,
        gateway_url: str | None = None,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        retry: RetryPolicy | None = None,
        progress: ProgressHook | None = None,
        request_timeout: float = 120.0,
        inline_limit: int = INLINE_LIMIT,
        batch_bytes: int = BATCH_BYTES,
        batch_packets: int = BATCH_PACKETS,
        files_in_flight: int = FILES_IN_FLIGHT,
        known_digests: KnownDigests | None = None,
        sha256: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        if files_in_flight < 1:
            raise ConfigError(
                f"files_in_flight must be at least 1, got {files_in_flight}"
            )
        url = gateway_url or Settings.load().gateway_url
        self.gateway_url = _check_url(url)
        self.concurrency = concurrency
        self._retry = retry or RetryPolicy()
        self.progress = progress
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10.0, sock_read=request_timeout
        )
        self._inline_limit = inline_limit
        self._batch_bytes = batch_bytes
        self._batch_packets = batch_packets
        self._files_in_flight = files_in_flight
        self._known_digests = known_digests
        self._sha256 = sha256
        self._rng = random.Random()
        self._troubled = False
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._large_runs = asyncio.Semaphore(
            max(1, concurrency * SLOT_BYTES // LARGE_RUN_BYTES)
        )
        self._batcher: Batcher | None = None
        self._questions: StatusQuestions | None = None
        self._dispatchers: list[asyncio.Task[None]] = []
        # Set on meeting a gateway from before the many-file status question,
        # or before /v1/chunks.
        self._status_file_by_file = False
        self._chunks_one_by_one = False

    async def __aenter__(self) -> Sender:
        connector = aiohttp.TCPConnector(
            limit=self.concurrency + 1, keepalive_timeout=60.0
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, raise_for_status=False
        )
        self._batcher = Batcher(
            self._post_batch,
            self._slots,
            max_bytes=self._batch_bytes,
            max_packets=self._batch_packets,
        )
        self._questions = StatusQuestions(
            self._ask_statuses, self._slots, max_files=STATUS_FILES_PER_QUESTION
        )
        self._dispatchers = [
            asyncio.create_task(self._batcher.run()),
            asyncio.create_task(self._questions.run()),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for dispatcher in self._dispatchers:
            dispatcher.cancel()
        await asyncio.gather(*self._dispatchers, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.close()
        if self._questions is not None:
            await self._questions.close()
        if self._session is not None:
            await self._session.close()
        self._session = self._batcher = self._questions = None
        self._dispatchers = []

    async def send_file(
        self,
        path: str | PathLike[str],
        *,
        type: str | None = None,
        file_id: str | None = None,
        device_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | str = DEFAULT_CHUNK_SIZE,
    ) -> SendResult:
        """Send one file from disk, resuming whatever the gateway already has."""
        path = Path(path)
        data_type = check_type(type) if type else infer_type(path.name)
        source = _open(path)
        try:
            return await self._send(
                source,
                label=str(path),
                file_name=path.name,
                data_type=data_type,
                file_id=file_id,
                device_id=device_id,
                metadata=metadata,
                chunk_size=chunk_size,
            )
        finally:
            source.close()

    async def send_bytes(
        self,
        data: bytes | bytearray | memoryview,
        *,
        type: str | None,
        file_name: str,
        file_id: str | None = None,
        device_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | str = DEFAULT_CHUNK_SIZE,
        content_type: str | None = None,
    ) -> SendResult:
        """Send bytes a robot already holds, as the file `file_name`."""
        if not file_name or "/" in file_name:
            raise ConfigError(
                f"file name {file_name!r} must be a plain, non-empty name without '/'"
            )
        data_type = check_type(type) if type else infer_type(file_name, content_type)
        return await self._send(
            BytesSource(data),
            label=file_name,
            file_name=file_name,
            data_type=data_type,
            file_id=file_id,
            device_id=device_id,
            metadata=metadata,
            chunk_size=chunk_size,
            content_type=content_type,
        )

    async def send_files(
        self,
        paths: Iterable[str | PathLike[str]],
        *,
        type: str | None = None,
        device_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | str = DEFAULT_CHUNK_SIZE,
    ) -> list[SendResult | DatahaulError]:
        """Send many files at once; each entry is its path's result or its error.

        One file failing does not stop the others; the caller looks at each.
        """
        gate = asyncio.Semaphore(self._files_in_flight)

        async def send_one(path: str | PathLike[str]) -> SendResult | DatahaulError:
            async with gate:
                try:
                    return await self.send_file(
                        path,
                        type=type,
                        device_id=device_id,
                        metadata=metadata,
                        chunk_size=chunk_size,
                    )
                except DatahaulError as error:
                    return error

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(send_one(path)) for path in paths]
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
        return [task.result() for task in tasks]

    async def file_status(self, file_id: str) -> dict[str, Any] | None:
        """What the gateway holds of a file, or None when it has seen none of it."""
        check_file_id(file_id)
        await self._slots.acquire()
        try:
            return await self._status_of(file_id)
        finally:
            self._slots.release()

    async def _status_of(self, file_id: str) -> dict[str, Any] | None:
        try:
            status, answer = await self._request(
                "GET", f"/v1/files/{file_id}", also_ok=(404,)
            )
        except _Refused as refusal:
            raise refusal.naming(file_id, None) from None
        return None if status == 404 else self._checked_status(file_id, answer)

    async def _ask_statuses(self, file_ids: list[str]) -> dict[str, Any]:
        """Many files' status in one request (StatusQuestions calls it)."""
        if self._status_file_by_file:
            return {file_id: await self._status_of(file_id) for file_id in file_ids}
        try:
            _, answer = await self._request(
                "POST",
                "/v1/files/status",
                data=_encoder.encode({"file_ids": file_ids}),
                headers={"Content-Type": "application/json"},
            )
        except _Refused as refusal:
            if refusal.status not in (404, 405):
                raise refusal.naming(file_ids[0], None) from None
            # A gateway from before this question: ask it file by file.
            self._status_file_by_file = True
            return await self._ask_statuses(file_ids)
        files = answer.get("files") if isinstance(answer, dict) else None
        if not isinstance(files, dict):
            raise SendError(
                f"the gateway's answer to a status question is not "
                f'{{"files": {{...}}}} but {answer!r}; is {self.gateway_url} a '
                "datahaul gateway?"
            )
        return {
            file_id: None
            if files.get(file_id) is None
            else self._checked_status(file_id, files[file_id])
            for file_id in file_ids
        }

    def _checked_status(self, file_id: str, answer: Any) -> dict[str, Any]:
        if not isinstance(answer, dict):
            raise SendError(
                f"the gateway's status of file {file_id} is not a JSON object: "
                f"{answer!r}; is {self.gateway_url} a datahaul gateway?"
            )
        return answer

    async def _send(
        self,
        source: ChunkSource,
        *,
        label: str,
        file_name: str,
        data_type: DataType,
        file_id: str | None,
        device_id: str | None,
        metadata: Mapping[str, Any] | None,
        chunk_size: int | str,
        content_type: str | None = None,
    ) -> SendResult:
        started = time.monotonic()
        self._emit(label, "hashing", source.size)
        sha256: PendingSha256 | None = None
        try:
            if file_id is not None:
                check_file_id(file_id)
            known = self._digests_known(source)
            if self._sha256:
                sha256 = PendingSha256.start(source, known.sha256 if known else None)
            xxh128 = await self._content_id(source, known)
            state = _FileSend(
                source=label,
                file_id=file_id or xxh128,
                file_name=file_name,
                type=data_type,
                content_type=content_type or guess_content_type(file_name),
                device_id=device_id,
                metadata=_check_metadata(metadata),
                xxh128=xxh128,
                sha256=sha256,
                plan=ChunkPlan(source.size, parse_size(chunk_size)),
            )
            result = await self._deliver(state, source)
        except OSError as error:
            self._emit(label, "failed", source.size)
            raise SendError(f"cannot read {label}: {error}") from error
        except BaseException:
            self._emit(label, "failed", source.size)
            raise
        finally:
            if sha256 is not None:
                await sha256.abandon()
        self._emit(label, "done", source.size)
        _log_sent(result, time.monotonic() - started)
        return result

    def _digests_known(self, source: ChunkSource) -> FileDigests | None:
        if self._known_digests is None or not isinstance(source, FileSource):
            return None
        return self._known_digests(source.identity)

    async def _content_id(self, source: ChunkSource, known: FileDigests | None) -> str:
        if known is not None:
            try:
                digest = await asyncio.wrap_future(known.xxh128)
            except OSError as error:
                log.debug("file.known_hash_failed", error=str(error))
            else:
                log.debug("file.hash_known", file_id=digest)
                return digest
        # A file small enough to be held whole is hashed here: a thread hop
        # costs the event loop more than hashing a quarter of a MiB.
        if source.size <= WHOLE_FILE_BYTES:
            return content_id(source)
        return await asyncio.to_thread(content_id, source)

    async def _deliver(self, state: _FileSend, source: ChunkSource) -> SendResult:
        # Asking the gateway what it has costs a round trip and a ledger read;
        # for a small file, sending it again is cheaper, and the workers
        # ignore the duplicates.
        status = (
            await self._status_question(state.file_id)
            if state.plan.size > RESUME_CHECK_BYTES
            else None
        )
        seqs = self._seqs_to_send(state, status)
        skipped = state.plan.total_seq - len(seqs)
        if skipped:
            missing_bytes = sum(state.plan.length(seq) for seq in seqs)
            self._emit(
                state.source,
                "sending",
                state.plan.size,
                state.plan.size - missing_bytes,
            )
        await self._send_seqs(state, source, seqs)
        if isinstance(source, FileSource):
            source.check_unchanged()
        return SendResult(
            source=state.source,
            file_id=state.file_id,
            file_name=state.file_name,
            type=state.type,
            size=state.plan.size,
            xxh128=state.xxh128,
            sha256=None if state.sha256 is None else await state.sha256.result(),
            total_seq=state.plan.total_seq,
            packets_sent=state.sent,
            packets_skipped=skipped,
            packets_buffered=state.buffered,
        )

    async def _status_question(self, file_id: str) -> dict[str, Any] | None:
        if self._questions is None:
            raise RuntimeError("use the Sender inside `async with Sender(...)`")
        status: dict[str, Any] | None = await self._questions.status(file_id)
        return status

    def _seqs_to_send(
        self, state: _FileSend, status: Mapping[str, Any] | None
    ) -> list[int]:
        total_seq = state.plan.total_seq
        if status is None:
            return list(range(1, total_seq + 1))
        known_type = status.get("type")
        if known_type is not None and known_type != state.type:
            raise ResumeConflict(
                f"the gateway already has file {state.file_id} as {known_type}, "
                f"not {state.type}; send it with --type {known_type}, or pass "
                "another --file-id to store it as a separate file"
            )
        known_total = status.get("total_seq")
        if known_total is not None and known_total != total_seq:
            raise ResumeConflict(
                f"the gateway already has file {state.file_id} in {known_total} "
                f"packets, but this send cuts it into {total_seq}; send it again "
                "with the --chunk-size used the first time, or pass another "
                "--file-id to store it as a separate file"
            )
        if status.get("complete") is True:
            return []
        try:
            return seqs_in_ranges(status.get("missing") or [], total_seq)
        except (TypeError, ValueError) as error:
            raise SendError(
                f"the gateway's missing ranges for file {state.file_id} make no "
                f"sense ({error}); is {self.gateway_url} a datahaul gateway?"
            ) from None

    async def _send_seqs(
        self, state: _FileSend, source: ChunkSource, seqs: list[int]
    ) -> None:
        # Small chunks gather into runs for the batcher; large ones into runs
        # of consecutive seqs up to LARGE_RUN_BYTES, each one request.
        settlement = Settlement(functools.partial(self._record, state))
        small: list[int] = []
        large: list[int] = []
        small_bytes = large_bytes = 0
        try:
            async with asyncio.TaskGroup() as group:
                for seq in seqs:
                    length = state.plan.length(seq)
                    if not self._goes_raw(state, seq):
                        await self._put_soon(group, state, source, large)
                        large, large_bytes = [], 0
                        small.append(seq)
                        small_bytes += length
                        if small_bytes >= RUN_BYTES and seq != seqs[-1]:
                            await self._enqueue(state, source, small, settlement)
                            small, small_bytes = [], 0
                        continue
                    await self._enqueue(state, source, small, settlement)
                    small, small_bytes = [], 0
                    if large and (
                        large[-1] + 1 != seq or large_bytes + length > LARGE_RUN_BYTES
                    ):
                        await self._put_soon(group, state, source, large)
                        large, large_bytes = [], 0
                    large.append(seq)
                    large_bytes += length
                if state.sha256 is not None:
                    # The run that holds the last packet waits for the file's
                    # SHA-256, so that at least one packet of the file carries
                    # it to the worker; the others left as they were read.
                    await state.sha256.result()
                await self._put_soon(group, state, source, large)
                await self._enqueue(state, source, small, settlement)
                group.create_task(settlement.wait())
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
        finally:
            settlement.abandon()

    async def _put_soon(
        self,
        group: asyncio.TaskGroup,
        state: _FileSend,
        source: ChunkSource,
        seqs: list[int],
    ) -> None:
        if not seqs:
            return
        ranges = [(state.plan.offset(seq), state.plan.length(seq)) for seq in seqs]
        large = sum(length for _, length in ranges) > SLOT_BYTES
        # Always in this order, and no slot holder waits for a run's turn,
        # so the two bounds cannot wait on each other.
        if large:
            await self._large_runs.acquire()
        try:
            await self._slots.acquire()
        except BaseException:
            if large:
                self._large_runs.release()
            raise
        try:
            read = await asyncio.to_thread(_read_and_hash_ranges, source, ranges)
        except BaseException:
            self._release_put(large)
            raise
        packets = [
            state.packet(seq, data, digest)
            for seq, (data, digest) in zip(seqs, read, strict=True)
        ]
        group.create_task(self._put(state, packets, large))

    def _release_put(self, large: bool) -> None:
        self._slots.release()
        if large:
            self._large_runs.release()

    def _goes_raw(self, state: _FileSend, seq: int) -> bool:
        return bool(state.raw_fields) and state.plan.length(seq) > self._inline_limit

    async def _read_packet(
        self, state: _FileSend, source: ChunkSource, seq: int
    ) -> Packet:
        offset, length = state.plan.offset(seq), state.plan.length(seq)
        if length < THREADED_READ_BYTES:
            # A small read from the page cache costs less than a thread hop.
            data, digest = _read_and_hash(source, offset, length)
        else:
            data, digest = await asyncio.to_thread(
                _read_and_hash, source, offset, length
            )
        return state.packet(seq, data, digest)

    async def _put(self, state: _FileSend, packets: list[Packet], large: bool) -> None:
        try:
            if len(packets) == 1 or self._chunks_one_by_one:
                for packet in packets:
                    await self._put_one(state, packet)
            else:
                await self._post_chunks(state, packets)
        finally:
            self._release_put(large)

    async def _post_chunks(self, state: _FileSend, packets: list[Packet]) -> None:
        try:
            _, answer = await self._request(
                "POST",
                "/v1/chunks",
                data=wire.encode_bundle(packets),
                headers={"Content-Type": wire.BUNDLE_CONTENT_TYPE},
            )
        except _Refused as refusal:
            if refusal.status in (404, 405):
                # A gateway from before /v1/chunks: one PUT per chunk.
                self._chunks_one_by_one = True
                for packet in packets:
                    await self._put_one(state, packet)
                return
            index = refusal.index if refusal.index is not None else 0
            culprit = packets[min(max(index, 0), len(packets) - 1)]
            raise refusal.naming(culprit.file_id, culprit.seq) from None
        length = sum(len(packet.data) for packet in packets)
        self._record(state, len(packets), length, _buffered(answer))

    async def _put_one(self, state: _FileSend, packet: Packet) -> None:
        headers = {
            _header_name(name): value for name, value in state.raw_fields.items()
        }
        headers[_header_name("chunk_xxh128")] = packet.chunk_xxh128 or ""
        params = _query_fields(state)
        try:
            _, answer = await self._request(
                "PUT",
                f"/v1/files/{packet.file_id}/chunks/{packet.seq}",
                data=packet.data,
                headers=headers,
                params=params,
            )
        except _Refused as refusal:
            raise refusal.naming(packet.file_id, packet.seq) from None
        self._record(state, 1, len(packet.data), _buffered(answer))

    async def _enqueue(
        self,
        state: _FileSend,
        source: ChunkSource,
        seqs: list[int],
        settlement: Settlement,
    ) -> None:
        # Waiting in the batcher while the batch is full is what bounds
        # memory: the next run is read only once this one has found a place.
        if not seqs:
            return
        if self._batcher is None:
            raise RuntimeError("use the Sender inside `async with Sender(...)`")
        queued = []
        for seq in seqs:
            packet = await self._read_packet(state, source, seq)
            encoded = _encoder.encode(packet)
            queued.append(
                Queued(state.file_id, seq, encoded, len(packet.data), settlement)
            )
        await self._batcher.add(queued)

    async def _post_batch(self, items: list[Queued]) -> None:
        try:
            await self._post_items(items)
        except asyncio.CancelledError:
            closed = SendError("the sender closed before the packet was sent")
            for item in items:
                item.fail(closed)
            raise
        except Exception as error:
            for item in items:
                item.fail(error)
        finally:
            self._slots.release()

    async def _post_items(self, items: list[Queued]) -> None:
        items = [item for item in items if not item.settlement.done]
        if not items:
            return
        try:
            _, answer = await self._request(
                "POST",
                "/v1/packets",
                data=encode_batch(items),
                headers={"Content-Type": "application/json"},
            )
        except _Refused as refusal:
            await self._after_refusal(items, refusal)
            return
        except DatahaulError as error:
            for item in items:
                item.fail(error)
            return
        accept_all(items, _buffered(answer))

    async def _after_refusal(self, items: list[Queued], refusal: _Refused) -> None:
        # A request is all or nothing: fail the file that was refused and send
        # the other files' packets again; without an index, halve to find it.
        index = refusal.index
        if index is not None and 0 <= index < len(items):
            culprit = items[index]
            error = refusal.naming(culprit.file_id, culprit.seq)
            for item in items:
                if item.file_id == culprit.file_id:
                    item.fail(error)
            await self._post_items(items)
        elif len(items) > 1:
            half = len(items) // 2
            await self._post_items(items[:half])
            await self._post_items(items[half:])
        else:
            items[0].fail(refusal.naming(items[0].file_id, items[0].seq))

    def _record(
        self, state: _FileSend, packets: int, length: int, buffered: bool
    ) -> None:
        state.sent += packets
        state.buffered += packets if buffered else 0
        self._emit(state.source, "sending", state.plan.size, length)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        also_ok: tuple[int, ...] = (),
        **options: Any,
    ) -> tuple[int, Any]:
        """One request, retried by the policy; raises _Refused on a 4xx."""
        if self._session is None:
            raise RuntimeError("use the Sender inside `async with Sender(...)`")
        budget = self._retry.start(self._rng)
        while True:
            status, body, retry_after, problem = await self._attempt(
                method, path, options
            )
            if status is not None and (
                status in also_ok or classify(status) is Outcome.SUCCESS
            ):
                self._link_ok()
                return status, _decode(body)
            if status is not None and classify(status, retry_after) is Outcome.REJECTED:
                raise _Refused(status, _error_answer(status, body))
            delay = budget.next_delay(status, retry_after)
            if delay is None:
                raise GatewayUnavailable(
                    url=self.gateway_url,
                    attempts=budget.attempts_made,
                    last_problem=problem,
                    busy_seconds=budget.busy_waited,
                )
            self._link_troubled(problem, delay)
            await asyncio.sleep(delay)

    def _link_troubled(self, problem: str, delay: float) -> None:
        # One line when the link turns bad and one when it heals, not one per
        # request: eight requests in flight would otherwise repeat each other.
        if not self._troubled:
            self._troubled = True
            log.warning(
                "gateway.retrying",
                url=self.gateway_url,
                problem=problem,
                delay=round(delay, 2),
            )

    def _link_ok(self) -> None:
        if self._troubled:
            self._troubled = False
            log.info("gateway.recovered", url=self.gateway_url)

    async def _attempt(
        self, method: str, path: str, options: dict[str, Any]
    ) -> tuple[int | None, bytes, str | None, str]:
        assert self._session is not None
        try:
            async with self._session.request(
                method, self.gateway_url + path, **options
            ) as response:
                body = await response.read()
                retry_after = response.headers.get("Retry-After")
                return (
                    response.status,
                    body,
                    retry_after,
                    _describe(response.status, body),
                )
        except (aiohttp.ClientError, TimeoutError) as error:
            return None, b"", None, f"{type(error).__name__}: {error}"

    def _emit(self, source: str, phase: Phase, size: int, advance: int = 0) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(source, phase, size, advance))


def _log_sent(result: SendResult, seconds: float) -> None:
    log.debug(
        "file.sent",
        file_id=result.file_id,
        file_name=result.file_name,
        type=result.type,
        bytes=result.size,
        packets_sent=result.packets_sent,
        packets_skipped=result.packets_skipped,
        packets_buffered=result.packets_buffered,
        seconds=round(seconds, 3),
    )


def _read_and_hash(source: ChunkSource, offset: int, length: int) -> tuple[bytes, str]:
    data = source.read(offset, length)
    return data, xxh128_of(data)


def _read_and_hash_ranges(
    source: ChunkSource, ranges: list[tuple[int, int]]
) -> list[tuple[bytes, str]]:
    return [_read_and_hash(source, offset, length) for offset, length in ranges]


def _open(path: Path) -> FileSource:
    try:
        if not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file"
            raise SendError(f"cannot send {path}: it is {what}; name files to send")
        return FileSource(path)
    except OSError as error:
        raise SendError(f"cannot read {path}: {error.strerror or error}") from None


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"gateway URL {url!r} is not an http(s) address; pass --gateway "
            "http://HOST:PORT or set DATAHAUL_GATEWAY_URL"
        )
    return url.rstrip("/")


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise ConfigError(f"metadata must be a JSON object, got {metadata!r}")
    try:
        json.dumps(dict(metadata))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"metadata cannot be written as JSON: {error}") from None
    return dict(metadata)


def _raw_fields(state: _FileSend, sha256: str | None) -> dict[str, str]:
    """The fields a raw PUT carries in headers, or {} when they cannot fit there.

    A SHA-256 to come counts against the budget before it is known, so that
    a file's chunks do not change their way when it comes.
    """
    fields = {
        "type": state.type,
        "total_seq": str(state.plan.total_seq),
        "file_xxh128": state.xxh128,
        "file_sha256": sha256,
        "file_name": state.file_name,
        "content_type": state.content_type,
        "device_id": state.device_id,
        "metadata": json.dumps(state.metadata) if state.metadata is not None else None,
    }
    present = {name: value for name, value in fields.items() if value is not None}
    headers = {name: value for name, value in present.items() if _header_safe(value)}
    to_come = state.sha256 is not None and sha256 is None
    budget = HEADER_BUDGET - (SHA256_HEX_DIGITS if to_come else 0)
    if sum(len(value) for value in present.values()) > budget:
        return {}
    return headers


def _query_fields(state: _FileSend) -> dict[str, str]:
    """Fields that cannot be headers (non-ASCII names, say) travel in the query."""
    candidates = {
        "file_name": state.file_name,
        "content_type": state.content_type,
        "device_id": state.device_id,
    }
    return {
        name: value
        for name, value in candidates.items()
        if value is not None and not _header_safe(value)
    }


def _header_safe(value: str) -> bool:
    return value.isascii() and value.isprintable()


def _header_name(field_name: str) -> str:
    return "X-Datahaul-" + "-".join(part.capitalize() for part in field_name.split("_"))


def _buffered(answer: Any) -> bool:
    return isinstance(answer, dict) and bool(answer.get("buffered"))


def _decode(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error_answer(status: int, body: bytes) -> dict[str, Any]:
    answer = _decode(body)
    if isinstance(answer, dict):
        return answer
    text = body.decode("utf-8", "replace").strip()[:300]
    if status == 413:
        text = text or "the request is larger than the gateway accepts"
    return {"error": f"HTTP {status}", "field": "request", "reason": text or "refused"}


def _describe(status: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()[:200]
    return f"HTTP {status}" + (f": {text}" if text else "")


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    # Prefer the error that explains the failure over the cancellations it caused.
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return group.exceptions[0]
