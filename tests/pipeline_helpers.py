"""Small helpers the pipeline tests share: packets, HTTP calls, waiting for files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from datahaul.storage.catalog import Catalog, FileRecord


@dataclass
class SourceFile:
    file_id: str
    type: str
    content: bytes
    chunk: int
    file_name: str = "sample.bin"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def total_seq(self) -> int:
        return max(1, -(-len(self.content) // self.chunk))

    def packets(self) -> list[dict[str, Any]]:
        """Every packet of the file as the JSON the design note shows."""
        return [self.packet(seq) for seq in range(1, self.total_seq + 1)]

    def packet(self, seq: int) -> dict[str, Any]:
        data = self.content[(seq - 1) * self.chunk : seq * self.chunk]
        return {
            "type": self.type,
            "file_id": self.file_id,
            "seq": seq,
            "total_seq": self.total_seq,
            "data": base64.b64encode(data).decode(),
            "file_name": self.file_name,
            "chunk_sha256": hashlib.sha256(data).hexdigest(),
            "file_sha256": self.sha256,
        }


def call(
    url: str,
    body: bytes | None = None,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request; the status and the decoded JSON answer."""
    request = urllib.request.Request(
        url, data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def post_packets(base: str, packets: Iterable[dict[str, Any]]) -> tuple[int, Any]:
    body = json.dumps(list(packets)).encode()
    return call(
        f"{base}/v1/packets",
        body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )


def wait_stored(
    catalog_url: str, file_ids: Iterable[str], timeout: float = 60.0
) -> dict[str, FileRecord]:
    """Wait until every file is stored (or failed); return their records."""
    wanted = set(file_ids)
    catalog = Catalog.open(catalog_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            records = {r.file_id: r for f in wanted if (r := catalog.get(f))}
            done = {f for f, r in records.items() if r.state in ("stored", "failed")}
            if done == wanted:
                return records
            if time.monotonic() > deadline:
                states = {f: records[f].state if f in records else None for f in wanted}
                raise AssertionError(f"files not stored in {timeout}s: {states}")
            time.sleep(0.1)
    finally:
        catalog.close()


def stored_bytes(catalog_url: str, record: FileRecord) -> bytes:
    """The stored content of a file, from the catalog or the blob store."""
    if record.location and record.location.startswith("catalog:texts/"):
        catalog = Catalog.open(catalog_url)
        try:
            content = catalog.text(record.file_id)
        finally:
            catalog.close()
        assert content is not None
        return content
    assert record.location
    assert record.location.startswith("file://")
    with open(record.location.removeprefix("file://"), "rb") as handle:
        return handle.read()


def file_rows(catalog_url: str, file_id: str) -> int:
    catalog = Catalog.open(catalog_url)
    try:
        rows = catalog.db.query(
            "SELECT COUNT(*) FROM files WHERE file_id = ?", (file_id,)
        )
        return int(rows[0][0])
    finally:
        catalog.close()


def staged_leftovers(
    catalog_url: str, data_dir: str, settle: float = 15.0
) -> tuple[int, list[str]]:
    """Chunk rows left in the catalog, and staging folders left on disk, once
    the workers' sweep has had `settle` seconds to clear what races left."""
    deadline = time.monotonic() + settle
    while True:
        catalog = Catalog.open(catalog_url)
        try:
            rows = int(catalog.db.query("SELECT COUNT(*) FROM chunks")[0][0])
        finally:
            catalog.close()
        staging = os.path.join(data_dir, "staging")
        folders = os.listdir(staging) if os.path.isdir(staging) else []
        if (rows, folders) == (0, []) or time.monotonic() > deadline:
            return rows, folders
        time.sleep(0.5)
