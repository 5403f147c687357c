"""The NATS JetStream object store, through nats-py's own API: the other ceiling.

The same source file is put into a file-backed bucket in fixed chunks and
read back into a file; the bucket is deleted afterwards.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

import nats
import structlog
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.errors import DigestMismatchError

from bench.procs import CpuMeter, named_process
from bench.registry import BenchmarkError, Figure, RunContext, benchmark
from bench.units import mb_per_s, size_name

log = structlog.get_logger("datahaul.bench")


@benchmark(
    "nats",
    "NATS JetStream object store: put the source file, get it back",
    order=40,
)
async def object_store(context: RunContext) -> list[Figure]:
    options = context.options
    source = context.source()
    copy = options.work_dir / "nats-copy.video"
    bucket = f"datahaul-bench-{secrets.token_hex(4)}"
    server = named_process("nats-server")
    meter = CpuMeter({"nats-server": server} if server else {})

    try:
        client = await nats.connect(options.nats_url, connect_timeout=5)
    except Exception as exc:
        raise BenchmarkError(
            f"cannot reach NATS at {options.nats_url} ({exc!r}); start nats-server "
            "with JetStream (-js) or pass --nats-url"
        ) from None
    version = client.connected_server_version
    context.facts["nats-server"] = f"{version.major}.{version.minor}.{version.patch}"
    try:
        jetstream = client.jetstream()
        store = await jetstream.create_object_store(
            bucket, ObjectStoreConfig(storage=StorageType.FILE)
        )
        try:
            meta = ObjectMeta(
                name="video",
                options=ObjectMetaOptions(max_chunk_size=options.nats_chunk),
            )
            with meter.measure(), source.path.open("rb") as reader:
                started = time.perf_counter()
                info = await store.put("video", reader, meta=meta)
                put_seconds = time.perf_counter() - started
            put_cores = meter.cores()

            with meter.measure(), copy.open("wb") as writer:
                started = time.perf_counter()
                await store.get("video", writeinto=writer)
                get_seconds = time.perf_counter() - started
            get_cores = meter.cores()
        except DigestMismatchError:
            raise BenchmarkError(
                "NATS handed back bytes that differ from the put"
            ) from None
        finally:
            await jetstream.delete_object_store(bucket)
    finally:
        await client.close()

    check_copy(copy, source.size, source.sha256)
    copy.unlink()
    chunk = size_name(options.nats_chunk)
    both = put_seconds + get_seconds
    return [
        Figure(
            "nats/put",
            f"NATS object store put, {chunk} chunks",
            mb_per_s(source.size, put_seconds),
            "MB/s",
            f"{info.chunks} chunks in {put_seconds:.2f} s; {put_cores}",
        ),
        Figure(
            "nats/get",
            "NATS object store get (nats-py)",
            mb_per_s(source.size, get_seconds),
            "MB/s",
            f"into a file, {get_seconds:.2f} s; {get_cores}",
        ),
        Figure(
            "nats/putget",
            "NATS object store put then get",
            mb_per_s(source.size, both),
            "MB/s",
            f"{both:.2f} s in all; the copy's SHA-256 matches the source",
        ),
    ]


def check_copy(copy_path: Path, size: int, sha256: str) -> None:
    """The bytes handed back must be the bytes put, or the figure means nothing."""
    digest = hashlib.sha256()
    total = 0
    with copy_path.open("rb") as copy:
        while block := copy.read(8 * 1024 * 1024):
            digest.update(block)
            total += len(block)
    if total != size or digest.hexdigest() != sha256:
        raise BenchmarkError(
            f"NATS returned {total} bytes with SHA-256 {digest.hexdigest()}, "
            f"expected {size} bytes with {sha256}"
        )
