"""The S3 blob store against a real S3-protocol server (moto's, on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from datahaul.errors import ConfigError, IntegrityError, StorageError
from datahaul.storage import s3
from datahaul.storage.blobs import open_store
from datahaul.storage.catalog import Catalog
from datahaul.storage.s3 import S3Store
from s3server import SECRET_KEY, S3Server

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """One S3 server for this module's tests, stopped at the end."""
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh bucket of this test's own, emptied and removed afterwards."""
    name = s3_server.create_bucket()
    yield name
    client = s3_server.client()
    for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
        client.abort_multipart_upload(
            Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
        )
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture
def store(s3_server: S3Server, bucket: str) -> S3Store:
    """A store under the prefix 'center' of this test's bucket."""
    return S3Store.open(s3_server.store_url(bucket, "center"))


def blocks_of(content: bytes, size: int = MiB) -> Iterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start : start + size]


def bucket_keys(server: S3Server, bucket: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def pending_uploads(server: S3Server, bucket: str) -> list[str]:
    listing = server.client().list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in listing.get("Uploads", [])]


def test_put_read_size_and_overwrite(store: S3Store, s3_server, bucket) -> None:
    """Small objects are stored under the prefix, read back whole, and replaced."""
    store.put("file-1/00000001-abc", b"first")
    store.put("file-1/00000001-abc", b"second version")

    assert store.read("file-1/00000001-abc") == b"second version"
    assert store.size("file-1/00000001-abc") == len(b"second version")
    assert bucket_keys(s3_server, bucket) == ["center/file-1/00000001-abc"]


def test_ranges_are_read_in_bounded_blocks(store: S3Store) -> None:
    """open_range returns exactly [start, end), in blocks of at most 1 MiB."""
    content = os.urandom(3 * MiB + 123)
    store.put("video/clip", content)

    blocks = list(store.open_range("video/clip", 10, None))
    assert b"".join(blocks) == content[10:]
    assert max(len(block) for block in blocks) <= MiB
    assert b"".join(store.open_range("video/clip", 5, 5000)) == content[5:5000]
    assert b"".join(store.open_range("video/clip", 7, 7)) == b""
    assert b"".join(store.open_range("video/clip", len(content), None)) == b""
    assert b"".join(store.open_range("video/clip", 0, 10**9)) == content


def test_prefixes_are_listed_and_deleted(store: S3Store, s3_server, bucket) -> None:
    """list_prefixes shows the folders directly below; delete_prefix one subtree."""
    for key in ("a/x/1", "a/x/2", "a/y/1", "b/1", "a-sibling/1", "top"):
        store.put(key, b"data")

    assert store.list_prefixes("") == ["a", "a-sibling", "b"]
    assert store.list_prefixes("a") == ["x", "y"]
    assert store.list_prefixes("nothing-here") == []

    store.delete_prefix("a")
    store.delete_prefix("never-written")
    assert bucket_keys(s3_server, bucket) == [
        "center/a-sibling/1",
        "center/b/1",
        "center/top",
    ]


def test_objects_in_a_folder_are_listed_and_deleted_by_key(
    store: S3Store, s3_server, bucket
) -> None:
    """list_names shows the objects directly in a folder; delete_keys removes
    the named ones, missing ones included, and leaves the rest."""
    for key in ("f1/seg-a", "f1/seg-b", "f1/deeper/c", "f10/seg-a"):
        store.put(key, b"data")

    assert store.list_names("f1") == ["seg-a", "seg-b"]
    assert store.list_names("nothing-here") == []

    store.delete_keys(["f1/seg-a", "f1/never-written"])
    assert bucket_keys(s3_server, bucket) == [
        "center/f1/deeper/c",
        "center/f1/seg-b",
        "center/f10/seg-a",
    ]


def test_delete_prefix_deletes_in_batches(
    store: S3Store, s3_server, bucket, monkeypatch
) -> None:
    """More objects than one delete request takes are all deleted."""
    monkeypatch.setattr(s3, "DELETE_BATCH", 2)
    for index in range(5):
        store.put(f"many/{index}", b"x")
    store.put("kept", b"y")

    store.delete_prefix("many")
    assert bucket_keys(s3_server, bucket) == ["center/kept"]


def test_stores_with_other_prefixes_do_not_see_each_other(s3_server, bucket) -> None:
    """Two stores in one bucket, under different prefixes, keep apart."""
    staging = S3Store.open(s3_server.store_url(bucket, "staging"))
    blobs = S3Store.open(s3_server.store_url(bucket, "blobs"))
    staging.put("f1/chunk", b"staged")
    blobs.put("f1/chunk", b"stored")

    staging.delete_prefix("f1")
    assert blobs.read("f1/chunk") == b"stored"
    assert blobs.list_prefixes("") == ["f1"]
    assert staging.list_prefixes("") == []


def test_missing_objects_raise_storage_errors_naming_them(store: S3Store) -> None:
    """Reading, sizing or ranging a missing object names the object."""
    with pytest.raises(StorageError, match=r"center/no/such.*no such object"):
        store.read("no/such")
    with pytest.raises(StorageError, match=r"center/no/such.*no such object"):
        store.size("no/such")
    with pytest.raises(StorageError, match=r"center/no/such"):
        list(store.open_range("no/such", 0, None))


def test_keys_that_leave_the_store_are_refused(store: S3Store) -> None:
    """A key with '..' or a leading '/' is refused, as on the filesystem."""
    for key in ("../other", "/absolute", "a/./b", ""):
        with pytest.raises(StorageError, match="not a relative path"):
            store.put(key, b"x")


def test_a_missing_bucket_is_reported_when_the_store_opens(s3_server) -> None:
    """Opening a store on a bucket that does not exist says to create it."""
    with pytest.raises(StorageError, match=r"bucket 'not-created-yet'.*create it"):
        S3Store.open(s3_server.store_url("not-created-yet"))


def test_open_store_picks_s3_and_the_url_keeps_the_secret_out(
    s3_server, bucket
) -> None:
    """open_store returns an S3Store for s3:// URLs; its url has no secret."""
    store = open_store(s3_server.store_url(bucket, "images", part_mib=6))

    assert isinstance(store, S3Store)
    assert store.part_bytes == 6 * MiB
    assert SECRET_KEY not in store.url
    assert store.url.startswith(f"s3://{bucket}/images?endpoint=")


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("s3://Bad_Bucket/x", "no valid bucket"),
        ("s3:///prefix", "no valid bucket"),
        ("s3://bucket/x?endpoint=ftp://host", "not an http"),
        ("s3://bucket/x?part_mib=2", "at least 5"),
        ("s3://bucket/x?part_mib=lots", "whole number"),
        ("s3://bucket/x?acess_key=a", r"unknown parameters \['acess_key'\]"),
        ("s3://bucket/x?access_key=a&endpoint=http://127.0.0.1:1", "both"),
    ],
)
def test_malformed_urls_are_config_errors(url: str, complaint: str) -> None:
    """Each mistake in a store URL is named before any request is made."""
    with pytest.raises(ConfigError, match=complaint):
        S3Store.open(url)


def test_no_credentials_says_which_variables_to_set(
    s3_server, bucket, monkeypatch, tmp_path
) -> None:
    """Without credentials anywhere, the error names the variables to set."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    # Keep botocore off the instance-metadata address and the user's files.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))

    with pytest.raises(StorageError, match="set AWS_ACCESS_KEY_ID"):
        S3Store.open(s3_server.store_url(bucket, credentials=False))


def test_credentials_come_from_the_standard_variables(
    s3_server, bucket, monkeypatch
) -> None:
    """A URL without credentials uses AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    store = S3Store.open(s3_server.store_url(bucket, credentials=False))
    store.put("k", b"v")
    assert store.read("k") == b"v"


def test_a_video_streams_in_parts_and_carries_its_sha256(
    store: S3Store, s3_server, bucket
) -> None:
    """A 20 MiB video goes up as a 3-part upload while it is still being read,
    arrives byte-identical, carries its SHA-256, and leaves nothing else behind."""
    content = os.urandom(20 * MiB)
    client = s3_server.client()
    seen_while_streaming: list[int] = []

    def slowly_read() -> Iterator[bytes]:
        for index, block in enumerate(blocks_of(content)):
            if index == 12:
                # 12 MiB read: the first 8 MiB part must already be uploaded.
                for upload in client.list_multipart_uploads(Bucket=bucket)["Uploads"]:
                    parts = client.list_parts(
                        Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    seen_while_streaming.extend(p["Size"] for p in parts["Parts"])
            yield block

    location = store.put_stream("video/ab/abc/clip.mp4", slowly_read())

    assert location == f"s3://{bucket}/center/video/ab/abc/clip.mp4"
    assert seen_while_streaming == [8 * MiB]
    head = client.head_object(Bucket=bucket, Key="center/video/ab/abc/clip.mp4")
    assert head["Metadata"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert store.sha256("video/ab/abc/clip.mp4") == head["Metadata"]["sha256"]
    assert b"".join(store.open_range("video/ab/abc/clip.mp4", 0, None)) == content
    assert bucket_keys(s3_server, bucket) == ["center/video/ab/abc/clip.mp4"]
    assert pending_uploads(s3_server, bucket) == []


def test_parts_grow_so_that_huge_files_fit_in_ten_thousand(
    s3_server, bucket, monkeypatch
) -> None:
    """Part sizes step up every PARTS_PER_STEP parts (lowered to 1 here)."""
    monkeypatch.setattr(s3, "PARTS_PER_STEP", 1)
    store = S3Store.open(s3_server.store_url(bucket, part_mib=5))
    content = os.urandom(16 * MiB)

    digest = hashlib.sha256(content).hexdigest()
    store.put_stream("video/grown.mp4", blocks_of(content), sha256=digest)

    head = s3_server.client().head_object(Bucket=bucket, Key="video/grown.mp4")
    assert head["ETag"].endswith('-3"')  # 5 + 10 + 1 MiB, not 5 + 5 + 5 + 1
    assert store.read("video/grown.mp4") == content


def test_a_declared_sha256_goes_straight_to_the_key(
    store: S3Store, s3_server, bucket
) -> None:
    """With the digest known up front the upload lands on the key directly."""
    content = os.urandom(9 * MiB)
    digest = hashlib.sha256(content).hexdigest()

    store.put_stream("image/photo.jpg", blocks_of(content), sha256=digest)

    head = s3_server.client().head_object(Bucket=bucket, Key="center/image/photo.jpg")
    assert head["Metadata"]["sha256"] == digest
    assert head["ETag"].endswith('-2"')  # a two-part upload, not a copy
    assert store.read("image/photo.jpg") == content


def test_a_wrong_declared_sha256_stores_nothing(
    store: S3Store, s3_server, bucket
) -> None:
    """Bytes that do not hash to the declared digest never become an object."""
    content = os.urandom(9 * MiB)

    with pytest.raises(IntegrityError, match="not the declared"):
        store.put_stream("image/photo.jpg", blocks_of(content), sha256="0" * 64)
    assert bucket_keys(s3_server, bucket) == []
    assert pending_uploads(s3_server, bucket) == []


def test_small_streams_are_one_request(store: S3Store, s3_server, bucket) -> None:
    """A stream shorter than a part, even an empty one, is one plain PUT."""
    store.put_stream("image/empty.png", iter([]))
    store.put_stream("image/small.png", iter([b"ab", b"cd"]))

    assert store.read("image/empty.png") == b""
    assert store.read("image/small.png") == b"abcd"
    assert store.sha256("image/small.png") == hashlib.sha256(b"abcd").hexdigest()
    assert bucket_keys(s3_server, bucket) == [
        "center/image/empty.png",
        "center/image/small.png",
    ]


@pytest.mark.parametrize("declared", [False, True], ids=["copied", "direct"])
def test_a_failed_upload_leaves_nothing_and_a_retry_stores_it(
    store: S3Store, s3_server, bucket, declared: bool
) -> None:
    """A stream that breaks after a part went up leaves no object and no pending
    upload; the retry at the same key stores the right bytes once."""
    content = os.urandom(18 * MiB)
    digest = hashlib.sha256(content).hexdigest() if declared else None

    def breaks_halfway() -> Iterator[bytes]:
        for index, block in enumerate(blocks_of(content)):
            if index == 10:
                raise StorageError("staging store went away")
            yield block

    with pytest.raises(StorageError, match="staging store went away"):
        store.put_stream("video/clip.mp4", breaks_halfway(), sha256=digest)
    assert bucket_keys(s3_server, bucket) == []
    assert pending_uploads(s3_server, bucket) == []

    store.put_stream("video/clip.mp4", blocks_of(content), sha256=digest)
    assert store.read("video/clip.mp4") == content
    assert store.sha256("video/clip.mp4") == hashlib.sha256(content).hexdigest()
    assert bucket_keys(s3_server, bucket) == ["center/video/clip.mp4"]


KILLED_UPLOADER = """
import sys, time
from datahaul.storage.s3 import S3Store

def blocks():
    for index in range(12):
        if index == 10:
            print("part uploaded", flush=True)
            time.sleep(120)
        yield bytes([index]) * (1024 * 1024)

S3Store.open(sys.argv[1]).put_stream("video/clip.mp4", blocks())
"""


def test_a_retry_clears_what_a_killed_uploader_left(
    store: S3Store, s3_server, bucket, tmp_path: Path
) -> None:
    """A process killed mid-upload leaves a pending upload; the next attempt at
    the same key removes it and stores one complete object."""
    uploader = subprocess.Popen(
        [sys.executable, "-c", KILLED_UPLOADER, s3_server.store_url(bucket, "center")],
        stdout=subprocess.PIPE,
    )
    try:
        assert uploader.stdout is not None
        assert uploader.stdout.readline() == b"part uploaded\n"
    finally:
        uploader.kill()
        uploader.wait()
    left = pending_uploads(s3_server, bucket)
    assert len(left) == 1
    assert left[0].startswith("center/video/clip.mp4.incoming-")

    content = os.urandom(9 * MiB)
    store.put_stream("video/clip.mp4", blocks_of(content))
    assert pending_uploads(s3_server, bucket) == []
    assert bucket_keys(s3_server, bucket) == ["center/video/clip.mp4"]
    assert store.read("video/clip.mp4") == content


def test_beyond_the_single_copy_limit_the_copy_goes_in_parts(
    store: S3Store, s3_server, bucket
) -> None:
    """Past CopyObject's limit (lowered here) the digest is set by a part copy."""
    store.single_copy_limit = 10 * MiB
    store.copy_part_bytes = 8 * MiB
    content = os.urandom(20 * MiB)

    store.put_stream("video/long.mp4", blocks_of(content))

    head = s3_server.client().head_object(Bucket=bucket, Key="center/video/long.mp4")
    assert head["ETag"].endswith('-3"')  # three copied parts: 8 + 8 + 4 MiB
    assert head["Metadata"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert store.read("video/long.mp4") == content
    assert bucket_keys(s3_server, bucket) == ["center/video/long.mp4"]


def test_locations_map_back_to_keys(store: S3Store, bucket) -> None:
    """A location put_stream returned names its key; other locations do not."""
    location = store.put_stream("image/a/b.png", iter([b"png"]))

    assert store.key_for_location(location) == "image/a/b.png"
    assert store.key_for_location(f"s3://{bucket}/elsewhere/b.png") is None
    assert store.key_for_location("file:///srv/blobs/b.png") is None


# The whole worker path: gateway and worker processes, staging and blobs on S3.


def put_chunk(gateway: str, file_id: str, seq: int, total: int, data: bytes, **fields):
    headers = {
        "X-Datahaul-Total-Seq": str(total),
        **{f"X-Datahaul-{k.replace('_', '-')}": v for k, v in fields.items()},
    }
    request = urllib.request.Request(
        f"{gateway}/v1/files/{file_id}/chunks/{seq}", data, headers, method="PUT"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200


def send_file(gateway: str, file_id: str, kind: str, content: bytes, chunk: int):
    total = -(-len(content) // chunk)
    for seq in range(1, total + 1):
        put_chunk(
            gateway,
            file_id,
            seq,
            total,
            content[(seq - 1) * chunk : seq * chunk],
            type=kind,
            file_name=f"{file_id}.bin",
            file_sha256=hashlib.sha256(content).hexdigest(),
        )


def wait_for_states(catalog_url: str, file_ids: list[str], timeout: float = 90.0):
    catalog = Catalog.open(catalog_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            records = {f: catalog.get(f) for f in file_ids}
            if all(r and r.state in ("stored", "failed") for r in records.values()):
                return records
            if time.monotonic() > deadline:
                states = {f: r.state if r else None for f, r in records.items()}
                raise AssertionError(f"files not stored within {timeout}s: {states}")
            time.sleep(0.2)
    finally:
        catalog.close()


@pytest.mark.timeout(180)
def test_workers_on_separate_hosts_share_only_postgres_and_s3(
    s3_server, bucket, gateway_factory, worker_factory, datahaul_pg_env, tmp_path
) -> None:
    """Two worker processes, each with a data directory of its own, stage chunks
    in S3 and store files in S3 through PostgreSQL, and keep nothing locally."""
    stores = {
        "DATAHAUL_STAGING_URL": s3_server.store_url(
            bucket, "staging", credentials=False
        ),
        "DATAHAUL_BLOB_URL": s3_server.store_url(bucket, "blobs", credentials=False),
    }
    worker_dirs = [tmp_path / "host-1", tmp_path / "host-2"]
    for folder in worker_dirs:
        folder.mkdir()
        env = {**datahaul_pg_env, **s3_server.env, **stores}
        env["DATAHAUL_DATA_DIR"] = str(folder)
        worker_factory("all", env=env)
    gateway = gateway_factory(env=datahaul_pg_env)

    run = uuid.uuid4().hex[:8]
    files = {
        f"video-{run}": ("video", os.urandom(10 * MiB), 512 * 1024),
        f"image-{run}": ("image", os.urandom(700 * 1024), 100 * 1024),
        f"text-{run}": ("text", b"log line\n" * 30_000, 128 * 1024),
    }
    for file_id, (kind, content, chunk) in files.items():
        send_file(gateway.url, file_id, kind, content, chunk)

    records = wait_for_states(datahaul_pg_env["DATAHAUL_CATALOG_URL"], list(files))
    blobs = S3Store.open(s3_server.store_url(bucket, "blobs"))
    for file_id, (kind, content, _) in files.items():
        record = records[file_id]
        assert record is not None
        assert record.state == "stored", record.error
        assert record.sha256 == hashlib.sha256(content).hexdigest()
        if kind == "text":
            continue
        key = blobs.key_for_location(record.location or "")
        assert key is not None, record.location
        assert blobs.read(key) == content
        assert blobs.sha256(key) == record.sha256

    staging = S3Store.open(s3_server.store_url(bucket, "staging"))
    assert staging.list_prefixes("") == []
    assert pending_uploads(s3_server, bucket) == []
    for folder in worker_dirs:
        assert [p.name for p in folder.rglob("*")] == []
