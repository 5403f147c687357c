"""The worker's staging and assembly, on the embedded catalog and a directory.

A file whose chunks were all recorded in its staging image (each chunk at
its place in the file) is stored by linking that image; every other history
must still end in exactly the bytes sent, through the copying path.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import xxhash

from datahaul.config import Settings
from datahaul.protocol.packet import Packet
from datahaul.storage.blobs import FilesystemStore, open_store
from datahaul.storage.catalog import Catalog
from datahaul.worker.assembler import Assembler, blob_key

CHUNK = 100_000  # over the 64 KiB kept inline, so chunks are staged
CONTENT = os.urandom(10 * CHUNK + 10_000)  # a small last chunk, as in real files


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.load(
        data_dir=tmp_path,
        catalog_url=f"sqlite:///{tmp_path / 'catalog.db'}",
        staging_url=f"file://{tmp_path / 'staging'}",
        blob_url=f"file://{tmp_path / 'blobs'}",
    )


@pytest.fixture
def catalog(settings: Settings) -> Iterator[Catalog]:
    catalog = Catalog.open(settings.catalog_url)
    yield catalog
    catalog.close()


def worker(settings: Settings, catalog: Catalog, owner: str = "w1") -> Assembler:
    return Assembler(
        settings,
        catalog,
        open_store(settings.staging_url),
        open_store(settings.blob_url),
        owner=owner,
    )


def chunks(content: bytes = CONTENT, file_id: str = "video-1") -> list[Packet]:
    pieces = [content[i : i + CHUNK] for i in range(0, len(content), CHUNK)]
    return [
        Packet(
            "video",
            file_id,
            seq,
            len(pieces),
            piece,
            file_name="run.mp4",
            file_sha256=hashlib.sha256(content).hexdigest(),
        )
        for seq, piece in enumerate(pieces, start=1)
    ]


def stage_in_batches(assembler: Assembler, batches: list[list[int]]) -> None:
    packets = chunks()
    for batch in batches:
        assembler.stage([packets[seq - 1] for seq in batch])


def finalize(assembler: Assembler, file_id: str = "video-1") -> str:
    done = assembler.finalize(file_id)
    assert done is not None, "this worker should have won the file"
    return done.state


def segments(settings: Settings, file_id: str = "video-1") -> list[Path]:
    folder = Path(settings.staging_url.removeprefix("file://")) / file_id
    return sorted(folder.iterdir())


def stored_blob(catalog: Catalog, file_id: str = "video-1") -> Path:
    record = catalog.get(file_id)
    assert record is not None
    assert record.state == "stored", record
    assert record.sha256 == hashlib.sha256(CONTENT).hexdigest()
    assert record.location is not None
    blob = Path(record.location.removeprefix("file://"))
    assert blob.read_bytes() == CONTENT
    return blob


IN_ORDER = [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_a_file_staged_once_in_order_is_stored_by_linking_its_image(
    settings: Settings, catalog: Catalog
) -> None:
    assembler = worker(settings, catalog)
    stage_in_batches(assembler, IN_ORDER)
    [segment] = segments(settings)
    assert segment.name.endswith("-image")
    assert segment.stat().st_size == len(CONTENT)
    inode = segment.stat().st_ino

    done = assembler.finalize("video-1")

    assert done is not None
    assert (done.state, done.linked) == ("stored", True)
    blob = stored_blob(catalog)
    assert blob.stat().st_ino == inode
    assert not segment.exists()  # staging is cleared; the blob keeps the bytes
    assert [p.name for p in blob.parent.iterdir()] == ["run.mp4"]


@pytest.mark.parametrize(
    ("field", "last_names", "state"),
    [
        ("file_sha256", hashlib.sha256(CONTENT).hexdigest(), "stored"),
        ("file_sha256", "00" * 32, "failed"),
        ("file_xxh128", xxhash.xxh3_128_hexdigest(CONTENT), "stored"),
        ("file_xxh128", "00" * 16, "failed"),
    ],
)
def test_a_digest_named_only_by_the_last_packet_is_what_the_file_is_checked_against(
    settings: Settings, catalog: Catalog, field: str, last_names: str, state: str
) -> None:
    """A sender may name the file's SHA-256 or XXH128 only on its last
    packet; the assembled file is checked against it all the same."""
    packets = [msgspec.structs.replace(p, file_sha256=None) for p in chunks()]
    packets[-1] = msgspec.structs.replace(packets[-1], **{field: last_names})
    assembler = worker(settings, catalog)
    assembler.stage(packets[-1:])
    assembler.stage(packets[:-1])

    assert finalize(assembler) == state
    record = catalog.get("video-1")
    assert record is not None
    assert getattr(record, field.replace("file_", "expected_")) == last_names
    if state == "failed":
        assert "differs from the sender's" in (record.error or "")


def test_a_worker_that_did_not_stage_the_file_links_it_after_reading_it_through(
    settings: Settings, catalog: Catalog
) -> None:
    stage_in_batches(worker(settings, catalog, "w1"), IN_ORDER)
    [segment] = segments(settings)
    inode = segment.stat().st_ino

    state = finalize(worker(settings, catalog, "w2"))

    assert state == "stored"
    assert stored_blob(catalog).stat().st_ino == inode


def test_a_segment_changed_on_disk_fails_the_file_when_read_through(
    settings: Settings, catalog: Catalog
) -> None:
    stage_in_batches(worker(settings, catalog, "w1"), IN_ORDER)
    [segment] = segments(settings)
    with open(segment, "r+b") as handle:
        handle.seek(CHUNK * 3 + 17)
        handle.write(b"\x00" if CONTENT[CHUNK * 3 + 17] else b"\x01")

    state = finalize(worker(settings, catalog, "w2"))

    assert state == "failed"
    record = catalog.get("video-1")
    assert record is not None
    assert "differs from the sender's" in (record.error or "")
    blobs = Path(settings.blob_url.removeprefix("file://"))
    assert not any(path.is_file() for path in blobs.rglob("*"))


def stored_in_place(settings: Settings, catalog: Catalog, assembler: Assembler) -> bool:
    """Finalize; say whether the blob is the staged image itself (not a copy)."""
    images = {p.stat().st_ino for p in segments(settings) if p.name.endswith("-image")}
    assert finalize(assembler) == "stored"
    return stored_blob(catalog).stat().st_ino in images


@pytest.mark.parametrize(
    ("batches", "in_place"),
    [
        ([[1, 2], [4, 5], [3], [6, 7, 8, 9, 10, 11]], True),  # a chunk overtaken
        ([[1, 2, 3], [3, 4], [2, 5, 6], [7, 8, 9, 10, 11]], True),  # redelivered
        ([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11], [11, 5]], True),  # late duplicates
        ([[1, 1, 2, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11]], True),  # twice in a batch
        # The last chunk first: the chunk size is not known yet, so that
        # chunk is staged on its own and the file is copied.
        ([[11], [10, 9], [8, 7, 6, 5, 4, 3, 2, 1]], False),
    ],
    ids=["overtaken", "redelivered", "late-duplicates", "doubled", "backwards"],
)
def test_chunks_out_of_order_or_twice_still_give_exactly_the_file(
    settings: Settings, catalog: Catalog, batches: list[list[int]], in_place: bool
) -> None:
    assembler = worker(settings, catalog)
    stage_in_batches(assembler, batches)

    assert stored_in_place(settings, catalog, assembler) is in_place


def test_each_outcome_answers_its_own_packet(
    settings: Settings, catalog: Catalog
) -> None:
    """Small, large, duplicate and conflicting packets mixed in one batch."""
    video = chunks()
    note = Packet("text", "note-1", 1, 2, b"first half ")
    clash = Packet("image", "video-1", 4, 11, video[3].data)
    again = msgspec.structs.replace(video[1])
    # The same object twice, too: outcomes must follow positions, not objects.
    batch = [video[2], note, video[0], clash, video[0], video[1], again]

    outcomes = worker(settings, catalog).stage(batch).outcomes

    assert [outcome.packet for outcome in outcomes] == batch
    statuses = [outcome.status for outcome in outcomes]
    assert statuses == [
        "staged",
        "staged",
        "staged",
        "conflict",
        "duplicate",
        "staged",
        "duplicate",
    ]


def test_bytes_of_a_write_that_failed_half_way_are_overwritten(
    settings: Settings, catalog: Catalog
) -> None:
    assembler = worker(settings, catalog)
    stage_in_batches(assembler, [[1, 2, 3]])
    [image] = segments(settings)
    # A write of chunk 4 that failed before its catalog commit (a full disk).
    with open(image, "r+b") as handle:
        handle.seek(3 * CHUNK)
        handle.write(os.urandom(CHUNK // 2))
    stage_in_batches(assembler, [[4, 5, 6, 7, 8, 9, 10, 11]])

    assert stored_in_place(settings, catalog, assembler)


def test_bytes_past_the_end_of_the_image_make_it_copied(
    settings: Settings, catalog: Catalog
) -> None:
    assembler = worker(settings, catalog)
    stage_in_batches(assembler, IN_ORDER)
    [image] = segments(settings)
    with open(image, "ab") as handle:
        handle.write(b"litter")

    assert not stored_in_place(settings, catalog, assembler)


def staging_folder(settings: Settings, file_id: str = "video-1") -> Path:
    return Path(settings.staging_url.removeprefix("file://")) / file_id


def test_the_staging_directory_deletes_objects_by_key_and_their_empty_folder(
    settings: Settings,
) -> None:
    staging = open_store(settings.staging_url)
    for key in ("f1/seg-a", "f1/seg-b", "f2/seg-a"):
        staging.put(key, b"data")
    assert staging.list_names("f1") == ["seg-a", "seg-b"]
    assert staging.list_names("nothing-here") == []

    staging.delete_keys(["f1/seg-a", "f1/never-written", "f2/seg-a"])
    assert staging.list_names("f1") == ["seg-b"]
    assert staging.list_prefixes("") == ["f1"]


class StagingWithAPause(FilesystemStore):
    """A staging directory that runs `meanwhile` once, after a batch's bytes
    are written and before the catalog records them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.meanwhile: Callable[[], None] | None = None

    def sync(self, keys: Iterable[str]) -> None:
        super().sync(keys)
        action, self.meanwhile = self.meanwhile, None
        if action is not None:
            action()


def test_a_file_expired_and_sent_again_is_not_built_on_its_old_image(
    settings: Settings, catalog: Catalog
) -> None:
    """Another worker expires the file and removes its image meanwhile."""
    assembler = worker(settings, catalog)
    stage_in_batches(assembler, [[1, 2, 3, 4, 5]])
    assert worker(settings, catalog, "w2").expire(time.time() + 1) == ["video-1"]
    assert not staging_folder(settings).exists()

    stage_in_batches(assembler, [list(range(1, 12))])

    assert finalize(assembler) == "stored"
    stored_blob(catalog)
    assert catalog.objects_to_remove() == []


def test_an_image_removed_by_an_expiry_between_its_write_and_its_record_is_redone(
    settings: Settings, catalog: Catalog
) -> None:
    """The expiry lands after this worker wrote into the file's old image and
    before the catalog recorded it: those chunks are staged again, afresh."""
    staging = StagingWithAPause(Path(settings.staging_url.removeprefix("file://")))
    assembler = Assembler(
        settings, catalog, staging, open_store(settings.blob_url), owner="w1"
    )
    stage_in_batches(assembler, [[1, 2, 3, 4, 5]])
    [old_image] = segments(settings)
    sweeper = worker(settings, catalog, "w2")
    staging.meanwhile = lambda: sweeper.expire(time.time() + 1)

    stage_in_batches(assembler, [[6, 7, 8, 9, 10, 11]])

    assert catalog.received_seqs("video-1") == [6, 7, 8, 9, 10, 11]
    assert not old_image.exists()
    stage_in_batches(assembler, [[1, 2, 3, 4, 5]])  # the resumed sender's
    assert finalize(assembler) == "stored"
    stored_blob(catalog)


def test_a_packet_that_starts_an_expired_file_over_keeps_its_staged_bytes(
    settings: Settings, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file starts over, on another worker, between the expiry's commit
    and its removal of the staging: the new chunks' bytes stay."""
    stage_in_batches(worker(settings, catalog, "w1"), [[1, 2, 3, 4, 5]])
    sweeping = Catalog.open(settings.catalog_url)
    sweeper = worker(settings, sweeping, "w2")
    resumed = worker(settings, catalog, "w3")
    expire = sweeping.expire

    def expire_then_resume(*args: Any) -> list[str]:
        expired = expire(*args)
        stage_in_batches(resumed, [list(range(1, 12))])
        return expired

    monkeypatch.setattr(sweeping, "expire", expire_then_resume)
    try:
        assert sweeper.expire(time.time() + 1) == ["video-1"]
    finally:
        sweeping.close()

    assert len(segments(settings)) == 1
    assert finalize(resumed) == "stored"
    stored_blob(catalog)


def test_leftovers_in_an_expired_files_folder_are_swept_with_the_folder(
    settings: Settings, catalog: Catalog
) -> None:
    """Bytes a crashed worker staged after the expiry go at the next sweep;
    once the file starts over, its folder is left to it."""
    assembler = worker(settings, catalog)
    stage_in_batches(assembler, [[1, 2, 3]])
    assert assembler.expire(time.time() + 1) == ["video-1"]
    staging = open_store(settings.staging_url)
    staging.put("video-1/00000004-crashed", b"never recorded")

    assembler.sweep_staging()
    assert not staging_folder(settings).exists()

    stage_in_batches(assembler, [[1, 2]])
    assembler.sweep_staging()
    assert len(segments(settings)) == 1
    assert catalog.received_seqs("video-1") == [1, 2]


def test_chunks_split_between_two_workers_are_copied_into_one_file(
    settings: Settings, catalog: Catalog
) -> None:
    first, second = worker(settings, catalog, "w1"), worker(settings, catalog, "w2")
    stage_in_batches(first, [[1, 2, 3, 4, 5]])
    stage_in_batches(second, [[6, 7, 8, 9, 10, 11]])
    assert len(segments(settings)) == 2

    state = finalize(second)

    assert state == "stored"
    stored_blob(catalog)


def test_a_store_cut_short_after_the_link_is_redone_by_another_worker(
    settings: Settings, catalog: Catalog
) -> None:
    """The first worker linked the blob, then died before the catalog knew."""
    first = worker(settings, catalog, "w1")
    stage_in_batches(first, IN_ORDER)
    assert catalog.claim("video-1", "w1", lease_seconds=0.05)
    record = catalog.get("video-1")
    assert record is not None
    blobs = open_store(settings.blob_url)
    assert isinstance(blobs, FilesystemStore)
    [image] = segments(settings)
    blobs.adopt(blob_key(record), image)
    time.sleep(0.1)  # the lease runs out

    assert finalize(worker(settings, catalog, "w2")) == "stored"
    blob = stored_blob(catalog)
    assert [p.name for p in blob.parent.iterdir()] == ["run.mp4"]


def test_the_blob_is_adopted_again_when_the_store_is_redone(
    settings: Settings, catalog: Catalog
) -> None:
    store = open_store(settings.blob_url)
    assert isinstance(store, FilesystemStore)
    source = Path(settings.data_dir) / "segment"
    source.write_bytes(CONTENT)

    first = store.adopt("video/ab/run.mp4", source)
    second = store.adopt("video/ab/run.mp4", source)

    assert first == second
    folder = store.path("video/ab")
    assert [p.name for p in folder.iterdir()] == ["run.mp4"]  # no temporary left
    assert store.read("video/ab/run.mp4") == CONTENT
