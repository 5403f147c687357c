"""Serving a stored file's bytes: where they are, which part, and under what name.

A file's bytes live in one of three places, told by its catalog location:
the catalog's text table (`catalog:texts/<id>`), the center's blob store
(a directory or an S3 bucket), or, for files stored before the blob store
moved, a directory the location names. Reads block and come in bounded
blocks, so a download of any size costs one block of memory.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from datahaul.center.errors import ApiError
from datahaul.storage.blobs import READ_BLOCK, BlobStore, FilesystemStore
from datahaul.storage.catalog import TEXT_LOCATION, Catalog, FileRecord

TEXT_TYPE = "text/plain; charset=utf-8"
FALLBACK_TYPE = "application/octet-stream"
RANGE_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


@dataclass
class Content:
    """A stored file's bytes: their size and a blocking reader of [start, end)."""

    size: int
    read: Callable[[int, int], Iterator[bytes]]


def locate(catalog: Catalog, store: BlobStore, record: FileRecord) -> Content:
    """Find a stored file's bytes (blocking); ApiError when they cannot be read."""
    location = record.location or ""
    if location.startswith(TEXT_LOCATION):
        return _text_content(catalog, record)

    key = key_in_store(store, location)
    if key is None and urlsplit(location).scheme == "file":
        return _directory_content(location, record)
    if key is None:
        raise ApiError(
            503,
            "StoreUnavailable",
            "location",
            f"file {record.file_id} is stored at {location}, outside this "
            f"center's blob store {store.url}; start the center with that "
            "store's URL (--blob-url or DATAHAUL_BLOB_URL)",
        )
    return _blob_content(store, key, record)


def key_in_store(store: BlobStore, location: str) -> str | None:
    """The store key a location names, or None when it is another store's."""
    finder = getattr(store, "key_for_location", None)
    if callable(finder):
        found = finder(location)
        return str(found) if found is not None else None
    head = store.url.rstrip("/") + "/"
    return location.removeprefix(head) if location.startswith(head) else None


def _text_content(catalog: Catalog, record: FileRecord) -> Content:
    text = catalog.text(record.file_id)
    if text is None:
        raise _missing(record, "the catalog's text table")
    return Content(len(text), lambda start, end: _slices(text, start, end))


def _blob_content(store: BlobStore, key: str, record: FileRecord) -> Content:
    try:
        size = store.size(key)
    except Exception as exc:
        raise _missing(record, f"{store.url} ({exc})") from None
    return Content(size, lambda start, end: store.open_range(key, start, end))


def _directory_content(location: str, record: FileRecord) -> Content:
    path = Path(unquote(urlsplit(location).path))
    if not path.is_file():
        raise _missing(record, str(path))
    folder = FilesystemStore(path.parent)
    return _blob_content(folder, path.name, record)


def _slices(data: bytes, start: int, end: int) -> Iterator[bytes]:
    for offset in range(start, end, READ_BLOCK):
        yield data[offset : min(end, offset + READ_BLOCK)]


def _missing(record: FileRecord, where: str) -> ApiError:
    return ApiError(
        500,
        "ContentMissing",
        "location",
        f"file {record.file_id} is recorded as stored, but its bytes are not in "
        f"{where}; check the store, then re-send the file",
    )


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) a Range header asks for; None means the whole file.

    A header this server does not understand, or several ranges at once, is
    ignored (RFC 9110 allows that) and the whole file is sent; a range that
    lies wholly past the end is refused with 416.
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = RANGE_SPEC.match(spec)
    if match is None or match.group(0).strip() == "-":
        return None
    first, last = match.group(1), match.group(2)

    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise unsatisfiable(header, size)
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise unsatisfiable(header, size)
    end = size if not last else min(size, int(last) + 1)
    return start, end


def unsatisfiable(header: str, size: int) -> ApiError:
    return ApiError(
        416,
        "RangeNotSatisfiable",
        "Range",
        f"range {header!r} lies outside the file's {size} bytes; ask for bytes "
        f"0-{max(size - 1, 0)}",
        headers={"Content-Range": f"bytes */{size}"},
    )


def content_type(record: FileRecord, as_text: bool) -> str:
    if as_text:
        return TEXT_TYPE
    if record.content_type:
        return record.content_type
    guessed, _ = mimetypes.guess_type(record.file_name or "")
    if guessed:
        return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed
    return TEXT_TYPE if record.type == "text" else FALLBACK_TYPE


def disposition(record: FileRecord, kind: str = "attachment") -> str:
    """A Content-Disposition naming the file, safe for any name it was sent with."""
    name = Path(record.file_name or "").name or record.file_id
    plain = re.sub(r"[^A-Za-z0-9._ -]", "_", name).strip() or record.file_id
    return f"{kind}; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


def etag(record: FileRecord) -> str | None:
    return f'"{record.sha256}"' if record.sha256 else None
