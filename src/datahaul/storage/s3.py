"""An S3-compatible blob store: AWS S3, MinIO, or any server speaking the S3 API.

It is named by a URL::

    s3://BUCKET/PREFIX?endpoint=http://127.0.0.1:9000&region=us-east-1

- BUCKET must exist; PREFIX (optional) is prepended to every key, so that
  several stores can share a bucket.
- ``endpoint``: the server's base URL. Given, requests use path-style
  addressing, which MinIO and most S3-compatible servers expect; absent,
  the store talks to AWS S3 itself.
- ``region``: default ``us-east-1`` (or ``AWS_REGION``/``AWS_DEFAULT_REGION``).
- ``access_key`` and ``secret_key``: credentials, both or neither. Without
  them the standard AWS chain applies: ``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), then the shared
  credentials file, then an instance role. Prefer the environment: a URL
  is easily copied into a shell history. The store's ``url`` attribute and
  every message and log event leave the secret out.
- ``part_mib``: the multipart part size in MiB, 8 by default (S3's floor is 5).

Large files arrive by `put_stream` as a multipart upload, one part at a
time, so memory holds one part, never the file. The object carries the
file's SHA-256 as its ``sha256`` metadata. S3 takes metadata only when an
upload starts, while the digest is known only at its end, so when the caller
cannot pass the digest up front the bytes go to a temporary key beside the
target and are then copied server-side onto the target with the digest
(CopyObject up to 5 GiB, UploadPartCopy beyond), and the temporary object is
deleted. When the caller does know the digest (the sender declared it), the
upload goes straight to the target and is aborted if the bytes disagree.

Either way an object appears at the target only complete: a failed upload is
aborted, and leftovers of earlier attempts at the same key (a worker killed
mid-upload) are removed before a new attempt starts. The caller must be the
only writer of a key at a time, which the catalog's lease sees to. Uploads
orphaned by a crash at a key never tried again stay invisible until a bucket
lifecycle rule (AbortIncompleteMultipartUpload) removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlencode, urlsplit

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from datahaul.errors import ConfigError, IntegrityError, StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, ObjectIdentifierTypeDef

log = structlog.get_logger("datahaul.storage")

MiB = 1024 * 1024
READ_BLOCK = MiB
DEFAULT_PART_MIB = 8
MIN_PART_MIB = 5
MAX_PARTS = 10_000
# Parts grow by one part size every thousand parts, so that the 10,000 parts
# S3 allows reach 55,000 part sizes (430 GiB at 8 MiB) while a small file
# still goes in small parts.
PARTS_PER_STEP = 1_000
SINGLE_COPY_LIMIT = 5 * 1024 * MiB
COPY_PART_BYTES = 512 * MiB
DELETE_BATCH = 1_000
INCOMING = ".incoming-"
QUERY_KEYS = {"endpoint", "region", "access_key", "secret_key", "part_mib"}
MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
DENIED_CODES = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
}
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Location:
    """Where a store lives and how to reach it, parsed from its URL."""

    bucket: str
    prefix: str
    endpoint: str | None
    region: str
    access_key: str | None
    secret_key: str | None
    part_bytes: int

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - QUERY_KEYS)
        if unknown:
            raise ConfigError(
                f"S3 store URL has unknown parameters {unknown}; "
                f"use only {sorted(QUERY_KEYS)}"
            )
        bucket = parts.hostname or ""
        if not BUCKET_NAME.match(bucket):
            raise ConfigError(
                f"S3 store URL names no valid bucket ({bucket!r}); "
                "use s3://BUCKET/PREFIX with a lower-case bucket name of 3-63 "
                "letters, digits, dots and hyphens"
            )
        return cls(
            bucket=bucket,
            prefix=parts.path.strip("/"),
            endpoint=_endpoint(query.get("endpoint")),
            region=query.get("region") or _default_region(),
            access_key=query.get("access_key"),
            secret_key=query.get("secret_key"),
            part_bytes=_part_bytes(query.get("part_mib")),
        )

    @property
    def public_url(self) -> str:
        """The URL without credentials: safe to print and log."""
        query = {"endpoint": self.endpoint, "region": self.region}
        if self.part_bytes != DEFAULT_PART_MIB * MiB:
            query["part_mib"] = str(self.part_bytes // MiB)
        shown = urlencode({k: v for k, v in query.items() if v}, safe=":/")
        return f"s3://{self.bucket}/{self.prefix}?{shown}"

    def client(self) -> S3Client:
        if (self.access_key is None) != (self.secret_key is None):
            raise ConfigError(
                f"S3 store {self.public_url}: give both access_key and secret_key "
                "in the URL, or neither and set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            )
        config = Config(
            # Custom endpoints (MinIO) rarely have a DNS name per bucket.
            s3={"addressing_style": "path" if self.endpoint else "auto"},
            retries={"mode": "standard", "max_attempts": 5},
            # CRC checksums on every request are the SDK's newest default,
            # which many S3-compatible servers get wrong (composite checksums
            # of multipart objects are misreported after a copy). The bytes
            # are covered anyway: by TLS on https, by the signed payload hash
            # on http, and end to end by the sha256 metadata.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=16,
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=config,
        )


class S3Store:
    """Objects in one bucket under one prefix; see the module docstring."""

    def __init__(self, location: S3Location) -> None:
        self.location = location
        self.bucket = location.bucket
        self.url = location.public_url
        self.part_bytes = location.part_bytes
        self.single_copy_limit = SINGLE_COPY_LIMIT
        self.copy_part_bytes = COPY_PART_BYTES
        self.client = location.client()

    @classmethod
    def open(cls, url: str) -> S3Store:
        """The store a URL names, once its bucket has answered."""
        store = cls(S3Location.parse(url))
        with store._failures("reach the bucket of", ""):
            store.client.head_bucket(Bucket=store.bucket)
        return store

    def object_key(self, key: str) -> str:
        """The bucket key of a store key: the prefix joined in front."""
        segments = key.split("/")
        if not key or key.startswith("/") or {".", ".."} & set(segments):
            raise StorageError(
                f"key {key!r} is not a relative path inside {self.url}; "
                "use '/'-separated names without '.' or '..'"
            )
        prefix = self.location.prefix
        return f"{prefix}/{key}" if prefix else key

    def location_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def key_for_location(self, location: str) -> str | None:
        """The store key of a location `put_stream` returned, if it is ours."""
        head = f"s3://{self.bucket}/"
        if not location.startswith(head):
            return None
        object_key = location.removeprefix(head)
        folder = self._folder("")
        if not object_key.startswith(folder):
            return None
        return object_key.removeprefix(folder)

    def put(self, key: str, data: bytes) -> None:
        target = self.object_key(key)
        with self._failures("write", target):
            self.client.put_object(Bucket=self.bucket, Key=target, Body=data)

    def put_stream(
        self, key: str, blocks: Iterable[bytes], sha256: str | None = None
    ) -> str:
        """Store a stream whole or not at all; the object carries its SHA-256.

        With `sha256` given, bytes that hash otherwise are refused with an
        IntegrityError and nothing is stored.
        """
        target = self.object_key(key)
        self._remove_leftovers(target)
        if sha256 is not None:
            self._upload(target, blocks, expected_sha256=sha256)
            return self.location_of(key)

        temporary = f"{target}{INCOMING}{uuid.uuid4().hex[:12]}"
        try:
            size, digest = self._upload(temporary, blocks, expected_sha256=None)
            self._copy(temporary, target, size, {"sha256": digest})
        finally:
            self._delete_quietly(temporary)
        return self.location_of(key)

    def _upload(
        self, target: str, blocks: Iterable[bytes], *, expected_sha256: str | None
    ) -> tuple[int, str]:
        """Upload in parts (one part in memory at a time); return size, digest."""
        hasher = hashlib.sha256()
        metadata = {"sha256": expected_sha256} if expected_sha256 else {}
        upload = _Upload(self, target, metadata)
        try:
            for block in blocks:
                hasher.update(block)
                upload.write(block)
            digest = hasher.hexdigest()
            if expected_sha256 is not None and digest != expected_sha256:
                raise IntegrityError(
                    f"stream for s3://{self.bucket}/{target} has SHA-256 {digest}, "
                    f"not the declared {expected_sha256}; nothing was stored"
                )
            upload.finish()
        except BaseException:
            upload.abort()
            raise
        log.debug("s3.uploaded", key=target, bytes=upload.size, parts=upload.count)
        return upload.size, digest

    def _put_whole(self, target: str, data: bytes, metadata: dict[str, str]) -> None:
        with self._failures("write", target):
            self.client.put_object(
                Bucket=self.bucket, Key=target, Body=data, Metadata=metadata
            )

    def _copy(
        self, source: str, target: str, size: int, metadata: dict[str, str]
    ) -> None:
        """Server-side copy that replaces the metadata; in parts beyond 5 GiB."""
        if size <= self.single_copy_limit:
            with self._failures("copy onto", target):
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=target,
                    CopySource={"Bucket": self.bucket, "Key": source},
                    Metadata=metadata,
                    MetadataDirective="REPLACE",
                )
            return

        part_bytes = max(self.copy_part_bytes, -(-size // MAX_PARTS))
        upload = _Upload(self, target, metadata)
        try:
            for start in range(0, size, part_bytes):
                upload.add_copy(source, start, min(start + part_bytes, size))
            upload.complete()
        except BaseException:
            upload.abort()
            raise

    def read(self, key: str) -> bytes:
        target = self.object_key(key)
        with self._failures("read", target):
            body = self.client.get_object(Bucket=self.bucket, Key=target)["Body"]
            with contextlib.closing(body):
                return body.read()

    def open_range(self, key: str, start: int, end: int | None) -> Iterator[bytes]:
        if end is not None and end <= start:
            return
        target = self.object_key(key)
        wanted = f"bytes={start}-{'' if end is None else end - 1}"
        with self._failures("read", target):
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=target, Range=wanted
                )
            except ClientError as exc:
                # Past the end is an empty range here, as for a file.
                if _code(exc) == "InvalidRange":
                    return
                raise
            with contextlib.closing(response["Body"]) as body:
                yield from body.iter_chunks(READ_BLOCK)

    def size(self, key: str) -> int:
        target = self.object_key(key)
        with self._failures("look up", target):
            return self.client.head_object(Bucket=self.bucket, Key=target)[
                "ContentLength"
            ]

    def sha256(self, key: str) -> str | None:
        """The SHA-256 recorded on an object by `put_stream`, if any."""
        target = self.object_key(key)
        with self._failures("look up", target):
            head = self.client.head_object(Bucket=self.bucket, Key=target)
        return head.get("Metadata", {}).get("sha256")

    def delete_prefix(self, prefix: str) -> None:
        folder = self._folder(prefix)
        batch: list[ObjectIdentifierTypeDef] = []
        for object_key in self._keys_under(folder):
            batch.append({"Key": object_key})
            if len(batch) == DELETE_BATCH:
                self._delete_batch(folder, batch)
                batch = []
        if batch:
            self._delete_batch(folder, batch)
        for object_key, upload_id in self._uploads_under(folder):
            self._abort_quietly(object_key, upload_id)

    def list_prefixes(self, prefix: str) -> list[str]:
        folder = self._folder(prefix)
        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        with self._failures("list", folder):
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=folder, Delimiter="/"
            ):
                for common in page.get("CommonPrefixes", []):
                    name = common.get("Prefix", "").removeprefix(folder).rstrip("/")
                    if name:
                        names.append(name)
        return sorted(names)

    def list_names(self, prefix: str) -> list[str]:
        folder = self._folder(prefix)
        names = (key.removeprefix(folder) for key in self._keys_under(folder))
        return sorted(name for name in names if name and "/" not in name)

    def delete_keys(self, keys: Iterable[str]) -> None:
        batch: list[ObjectIdentifierTypeDef] = []
        for key in keys:
            batch.append({"Key": self.object_key(key)})
            if len(batch) == DELETE_BATCH:
                self._delete_batch(self.location.prefix, batch)
                batch = []
        if batch:
            self._delete_batch(self.location.prefix, batch)

    def sync(self, keys: Iterable[str]) -> None:
        # S3 acknowledges a write only once it is durable.
        return None

    def _folder(self, prefix: str) -> str:
        """The bucket prefix of the objects under a store prefix ('' = all)."""
        prefix = prefix.strip("/")
        if prefix:
            return self.object_key(prefix) + "/"
        return self.location.prefix + "/" if self.location.prefix else ""

    def _keys_under(self, folder: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._failures("list", folder):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=folder):
                for item in page.get("Contents", []):
                    yield item["Key"]

    def _uploads_under(self, prefix: str) -> list[tuple[str, str]]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        found: list[tuple[str, str]] = []
        with self._failures("list the pending uploads under", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    found.append((upload["Key"], upload["UploadId"]))
        return found

    def _delete_batch(self, folder: str, batch: list[ObjectIdentifierTypeDef]) -> None:
        with self._failures("delete objects under", folder):
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise StorageError(
                f"could not delete {len(errors)} objects under "
                f"s3://{self.bucket}/{folder}, e.g. {first.get('Key')!r}: "
                f"{first.get('Code')} {first.get('Message')}; check that the "
                "credentials may delete in this bucket"
            )

    def _remove_leftovers(self, target: str) -> None:
        """Abort and delete what earlier attempts at this key left behind."""
        uploads = [
            (key, upload_id)
            for key, upload_id in self._uploads_under(target)
            if key == target or key.startswith(target + INCOMING)
        ]
        for key, upload_id in uploads:
            self._abort_quietly(key, upload_id)
        temporaries = list(self._keys_under(target + INCOMING))
        for key in temporaries:
            self._delete_quietly(key)
        if uploads or temporaries:
            log.info(
                "s3.leftovers_removed",
                key=target,
                uploads=len(uploads),
                temporaries=len(temporaries),
            )

    def _abort_quietly(self, object_key: str, upload_id: str) -> None:
        # A failed abort leaves an invisible upload; the failure that got us
        # here matters more than this one.
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=object_key, UploadId=upload_id
            )
        except (ClientError, BotoCoreError) as exc:
            log.warning(
                "s3.abort_failed", bucket=self.bucket, key=object_key, error=str(exc)
            )

    def _delete_quietly(self, object_key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=object_key)
        except (ClientError, BotoCoreError) as exc:
            log.warning(
                "s3.delete_failed", bucket=self.bucket, key=object_key, error=str(exc)
            )

    @contextlib.contextmanager
    def _failures(self, action: str, object_key: str) -> Iterator[None]:
        """Turn the client's errors into StorageErrors that say what to do."""
        where = f"s3://{self.bucket}/{object_key}"
        try:
            yield
        except ClientError as exc:
            raise StorageError(self._explain(action, object_key, exc)) from exc
        except NoCredentialsError:
            raise StorageError(
                f"no credentials to {action} {where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or access_key and secret_key in the "
                "store URL"
            ) from None
        except BotoCoreError as exc:
            raise StorageError(
                f"could not {action} {where} at {self._endpoint_name}: {exc}; "
                "check that the S3 endpoint is up and reachable"
            ) from exc

    def _explain(self, action: str, object_key: str, exc: ClientError) -> str:
        where = f"s3://{self.bucket}/{object_key}"
        code = _code(exc)
        # HEAD answers carry no error body: a bare 404 on the bucket itself
        # means the bucket is missing.
        if code == "NoSuchBucket" or (code in MISSING_CODES and not object_key):
            return (
                f"bucket {self.bucket!r} does not exist at {self._endpoint_name}; "
                "create it, or fix the bucket in the store URL"
            )
        if code in MISSING_CODES:
            return f"could not {action} {where}: no such object"
        if code in DENIED_CODES:
            return (
                f"{self._endpoint_name} refused to let us {action} {where} "
                f"({code}); check the access key, secret key and region, and "
                "that they may use this bucket"
            )
        message = exc.response.get("Error", {}).get("Message", "")
        return f"could not {action} {where}: {code} {message}".rstrip()

    @property
    def _endpoint_name(self) -> str:
        return self.location.endpoint or f"AWS S3 ({self.location.region})"


class _Upload:
    """One object going up: a plain PUT if it fits in a part, else multipart.

    The multipart upload starts only once a whole part is buffered, so small
    files cost one request, and parts grow every PARTS_PER_STEP parts.
    """

    def __init__(self, store: S3Store, key: str, metadata: dict[str, str]) -> None:
        self.store = store
        self.key = key
        self.metadata = metadata
        self.upload_id: str | None = None
        self.parts: list[CompletedPartTypeDef] = []
        self.buffer = bytearray()
        self.size = 0

    @property
    def count(self) -> int:
        return max(len(self.parts), 1)

    def write(self, block: bytes) -> None:
        self.buffer += block
        while len(self.buffer) >= self._part_size():
            part_size = self._part_size()
            self._add(bytes(self.buffer[:part_size]))
            del self.buffer[:part_size]

    def finish(self) -> None:
        if self.upload_id is None:
            self.store._put_whole(self.key, bytes(self.buffer), self.metadata)
            self.size = len(self.buffer)
            return
        if self.buffer:
            self._add(bytes(self.buffer))
        self.complete()

    def _part_size(self) -> int:
        return self.store.part_bytes * (1 + len(self.parts) // PARTS_PER_STEP)

    def _start(self) -> str:
        if self.upload_id is None:
            with self.store._failures("start an upload to", self.key):
                response = self.store.client.create_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, Metadata=self.metadata
                )
            self.upload_id = response["UploadId"]
        return self.upload_id

    def _add(self, data: bytes) -> None:
        number = len(self.parts) + 1
        if number > MAX_PARTS:
            raise StorageError(
                f"s3://{self.store.bucket}/{self.key} needs more than {MAX_PARTS} "
                "parts; raise part_mib in the store URL"
            )
        upload_id = self._start()
        with self.store._failures(f"upload part {number} of", self.key):
            response = self.store.client.upload_part(
                Bucket=self.store.bucket,
                Key=self.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
            )
        self.parts.append({"ETag": response["ETag"], "PartNumber": number})
        self.size += len(data)

    def add_copy(self, source: str, start: int, end: int) -> None:
        number = len(self.parts) + 1
        upload_id = self._start()
        with self.store._failures(f"copy part {number} onto", self.key):
            response = self.store.client.upload_part_copy(
                Bucket=self.store.bucket,
                Key=self.key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.store.bucket, "Key": source},
                CopySourceRange=f"bytes={start}-{end - 1}",
            )
        etag = response.get("CopyPartResult", {}).get("ETag", "")
        self.parts.append({"ETag": etag, "PartNumber": number})
        self.size += end - start

    def complete(self) -> None:
        upload_id = self._start()
        with self.store._failures("complete the upload to", self.key):
            self.store.client.complete_multipart_upload(
                Bucket=self.store.bucket,
                Key=self.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": self.parts},
            )

    def abort(self) -> None:
        """Drop the parts sent so far; nothing appears at the key."""
        if self.upload_id is None:
            return
        self.store._abort_quietly(self.key, self.upload_id)
        log.warning(
            "s3.upload_aborted",
            bucket=self.store.bucket,
            key=self.key,
            parts=self.count,
        )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _endpoint(raw: str | None) -> str | None:
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"S3 endpoint {raw!r} is not an http:// or https:// URL; "
            "use e.g. endpoint=http://127.0.0.1:9000"
        )
    return raw.rstrip("/")


def _default_region() -> str:
    return (
        os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )


def _part_bytes(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PART_MIB * MiB
    try:
        mib = int(raw)
    except ValueError:
        mib = 0
    if mib < MIN_PART_MIB:
        raise ConfigError(
            f"S3 store URL: part_mib={raw!r} must be a whole number of MiB, "
            f"at least {MIN_PART_MIB} (S3's smallest part)"
        )
    return mib * MiB
