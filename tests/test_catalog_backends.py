"""The catalog behaves the same on SQLite (embedded) and PostgreSQL (production).

Every test runs once per backend. On PostgreSQL each test gets a schema of
its own inside the run's database (conftest's `pg_url`), dropped afterwards.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from datahaul.config import ENV_PREFIX
from datahaul.protocol.packet import Packet
from datahaul.storage.catalog import (
    ASSEMBLING,
    EXPIRED,
    MIGRATIONS,
    RECEIVING,
    STORED,
    Catalog,
    missing_ranges,
)
from datahaul.storage.sql import open_database

INLINE_LIMIT = 64
T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty catalog database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return

    pg_url: str = request.getfixturevalue("pg_url")
    schema = f"catalog_{secrets.token_hex(4)}"
    _admin(pg_url, sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield f"{pg_url}?options={quote(f'-csearch_path={schema}')}"
    _admin(pg_url, sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def _admin(url: str, statement: sql.Composed) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(statement)


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    """A migrated catalog on this test's database, closed afterwards."""
    opened = Catalog.open(catalog_url)
    yield opened
    opened.close()


def packet(
    file_id: str,
    seq: int,
    total: int,
    data: bytes = b"abc",
    kind: str = "image",
    **fields: Any,
) -> Packet:
    return Packet(
        type=kind,  # type: ignore[arg-type]
        file_id=file_id,
        seq=seq,
        total_seq=total,
        data=data,
        **fields,
    )


def stage(catalog: Catalog, *packets: Packet) -> tuple[list[tuple[int, str]], set[str]]:
    """Stage packets inline (small) or under a name (large); (seq, status) each."""
    items = [
        (p, None if len(p.data) <= INLINE_LIMIT else f"{p.seq:08d}-x") for p in packets
    ]
    result = catalog.stage(items, INLINE_LIMIT)
    return [(o.packet.seq, o.status) for o in result.outcomes], result.complete


def stage_whole(catalog: Catalog, file_id: str, total: int = 2, **fields: Any) -> None:
    stage(catalog, *(packet(file_id, s, total, **fields) for s in range(1, total + 1)))


def at_once(count: int, catalog_url: str, action: Callable[[Catalog], T]) -> list[T]:
    """Run action in `count` threads, each with its own connection, released
    together; return what each returned."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        catalog = Catalog(open_database(catalog_url))
        try:
            barrier.wait(timeout=10)
            results[index] = action(catalog)
        except BaseException as exc:
            results[index] = exc
        finally:
            catalog.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    return results


def test_migrating_again_is_a_no_op(catalog: Catalog) -> None:
    """A migrated catalog applies nothing the second time and keeps its rows."""
    stage_whole(catalog, "kept", total=1)

    assert catalog.migrate() == []
    assert catalog.get("kept") is not None
    versions = catalog.db.query("SELECT version FROM schema_migrations")
    assert sorted(row[0] for row in versions) == [v for v, _ in MIGRATIONS]


def test_processes_starting_together_migrate_once(catalog_url: str) -> None:
    """Several catalogs opening one empty database at once apply each
    migration exactly once between them."""
    applied = at_once(4, catalog_url, lambda catalog: catalog.migrate())

    assert sorted(v for versions in applied for v in versions) == [
        v for v, _ in MIGRATIONS
    ]


def test_staging_records_each_chunk_once(catalog: Catalog) -> None:
    """Duplicates, in one batch or a later one, are recorded once; the last
    new chunk completes the file; chunks come back in seq order."""
    big = b"x" * (INLINE_LIMIT + 1)
    outcomes, complete = stage(
        catalog, packet("f", 2, 3, big), packet("f", 1, 3), packet("f", 1, 3)
    )
    assert outcomes == [(2, "staged"), (1, "staged"), (1, "duplicate")]
    assert complete == set()

    outcomes, complete = stage(catalog, packet("f", 2, 3, big), packet("f", 3, 3))
    assert outcomes == [(2, "duplicate"), (3, "staged")]
    assert complete == {"f"}

    record = catalog.get("f")
    assert record is not None
    assert (record.received, record.received_bytes) == (3, len(big) + 6)
    chunks = [(c.seq, c.staged_name, c.inline_data) for c in catalog.chunks("f")]
    assert chunks == [(1, None, b"abc"), (2, "00000002-x", None), (3, None, b"abc")]


def test_conflicting_packets_are_refused(catalog: Catalog) -> None:
    """A packet whose type or total_seq contradicts its file is a conflict."""
    stage(catalog, packet("f", 1, 3, kind="video"))

    outcomes, _ = stage(
        catalog, packet("f", 2, 4, kind="video"), packet("f", 2, 3, kind="image")
    )
    assert outcomes == [(2, "conflict"), (2, "conflict")]
    assert catalog.received_seqs("f") == [1]


DIGESTS = pytest.mark.parametrize(
    ("field", "digits"), [("file_sha256", 64), ("file_xxh128", 32)]
)


@DIGESTS
def test_a_file_digest_may_come_with_a_later_packet(
    catalog: Catalog, field: str, digits: int
) -> None:
    """Packets that name no whole-file digest leave the file's expected one
    open; the first packet that names one sets it, whatever batch it is in."""
    digest = "ab" * (digits // 2)
    stage(catalog, packet("f", 1, 3), packet("f", 2, 3))
    record = catalog.get("f")
    assert record is not None
    assert getattr(record, field.replace("file_", "expected_")) is None

    outcomes, complete = stage(catalog, packet("f", 3, 3, **{field: digest}))

    assert (outcomes, complete) == ([(3, "staged")], {"f"})
    record = catalog.get("f")
    assert record is not None
    assert getattr(record, field.replace("file_", "expected_")) == digest


@DIGESTS
def test_a_packet_naming_another_file_digest_is_refused(
    catalog: Catalog, field: str, digits: int
) -> None:
    """Once a file's digest is known, a packet that names another one is a
    conflict, in the same batch or a later one; one that names none is not."""
    first, other = "ab" * (digits // 2), "cd" * (digits // 2)
    outcomes, _ = stage(
        catalog,
        packet("f", 1, 4, **{field: first}),
        packet("f", 2, 4, **{field: other}),
    )
    assert outcomes == [(1, "staged"), (2, "conflict")]

    outcomes, _ = stage(catalog, packet("f", 2, 4), packet("f", 3, 4, **{field: other}))
    assert outcomes == [(2, "staged"), (3, "conflict")]
    record = catalog.get("f")
    assert record is not None
    assert getattr(record, field.replace("file_", "expected_")) == first


def test_paging_through_chunks_keeps_order(catalog: Catalog) -> None:
    """A file of more chunks than a page is read back complete and in order."""
    stage_whole(catalog, "long", total=150)

    assert [c.seq for c in catalog.chunks("long", page=64)] == list(range(1, 151))


def test_only_one_owner_claims_a_complete_file(catalog: Catalog) -> None:
    """An incomplete file cannot be claimed; a complete one by one owner only."""
    stage(catalog, packet("f", 1, 2))
    assert not catalog.claim("f", "worker-a", 30)

    stage(catalog, packet("f", 2, 2))
    assert catalog.claim("f", "worker-a", 30)
    assert not catalog.claim("f", "worker-b", 30)
    record = catalog.get("f")
    assert record is not None
    assert record.state == ASSEMBLING


def test_simultaneous_claims_have_one_winner(
    catalog: Catalog, catalog_url: str
) -> None:
    """Workers claiming the same file at the same moment: exactly one wins."""
    stage_whole(catalog, "contested")

    wins = at_once(
        6, catalog_url, lambda other: other.claim("contested", secrets.token_hex(3), 30)
    )
    assert wins.count(True) == 1


def test_a_lease_is_renewed_then_taken_over_once_it_runs_out(
    catalog: Catalog,
) -> None:
    """The owner renews its lease; once it runs out another worker takes the
    file over, and the first can neither renew nor finish it."""
    stage_whole(catalog, "f")
    assert catalog.claim("f", "worker-a", 0.5)
    assert catalog.renew("f", "worker-a", 0.5)
    assert not catalog.renew("f", "worker-b", 0.5)
    assert not catalog.claim("f", "worker-b", 30)
    assert catalog.due_for_finalize(time.time()) == []

    time.sleep(0.6)
    assert catalog.due_for_finalize(time.time()) == ["f"]
    assert catalog.claim("f", "worker-b", 30)

    record = catalog.get("f")
    assert record is not None
    assert not catalog.renew("f", "worker-a", 30)
    assert not catalog.finish(record, "worker-a", state=STORED)
    assert catalog.finish(record, "worker-b", state=STORED, location="s3://b/k")


def test_finishing_records_the_result_and_drops_the_chunks(catalog: Catalog) -> None:
    """finish stores size, digest and location (or the text) and deletes the
    file's chunk rows, leaving other files' chunks alone."""
    stage_whole(catalog, "done", kind="text")
    stage(catalog, packet("other", 1, 2))
    assert catalog.claim("done", "worker-a", 30)
    record = catalog.get("done")
    assert record is not None

    finished = catalog.finish(
        record,
        "worker-a",
        state=STORED,
        size=6,
        sha256="d" * 64,
        location="catalog:texts/done",
        text=b"abcabc",
    )

    assert finished
    stored = catalog.get("done")
    assert stored is not None
    assert (stored.state, stored.size, stored.sha256) == (STORED, 6, "d" * 64)
    assert stored.stored_at is not None
    assert catalog.text("done") == b"abcabc"
    assert catalog.received_seqs("done") == []
    assert catalog.received_seqs("other") == [1]


def test_stale_files_expire_and_a_new_packet_starts_them_over(
    catalog: Catalog,
) -> None:
    """An idle incomplete file expires, losing its chunks; a later packet for it
    starts it again from nothing."""
    stage(catalog, packet("idle", 1, 3), packet("idle", 2, 3))
    stage_whole(catalog, "complete-one")
    assert catalog.claim("complete-one", "worker-a", 30)

    assert catalog.expire(time.time() - 60) == []
    assert catalog.expire(time.time() + 1) == ["idle"]

    record = catalog.get("idle")
    assert record is not None
    assert (record.state, record.received) == (EXPIRED, 0)
    assert catalog.received_seqs("idle") == []

    stage(catalog, packet("idle", 3, 3))
    record = catalog.get("idle")
    assert record is not None
    assert (record.state, record.received) == (RECEIVING, 1)
    assert catalog.states(["idle", "complete-one", "unknown"]) == {
        "idle": RECEIVING,
        "complete-one": ASSEMBLING,
    }


def staged_as(*items: tuple[Packet, str]) -> list[tuple[Packet, str | None]]:
    return list(items)


BIG = b"x" * (INLINE_LIMIT + 1)


def test_an_expiry_discards_the_objects_its_chunks_and_its_folder_held(
    catalog: Catalog,
) -> None:
    """The objects named by the expired chunks and those listed in the folder
    are to be removed; a chunk staged into one of them later is stale, one
    staged into a new object counts, and finishing the file forgets them."""
    catalog.stage(
        staged_as(
            (packet("late", 1, 3, BIG), "image-a@0"),
            (packet("late", 2, 3, BIG), "image-a@65"),
        ),
        INLINE_LIMIT,
    )
    listed = {"late": ["image-a", "orphan-b"]}
    assert catalog.expire(time.time() + 1, listed) == ["late"]
    assert catalog.objects_to_remove() == [("late", "image-a"), ("late", "orphan-b")]

    result = catalog.stage(
        staged_as(
            (packet("late", 1, 3, BIG), "image-a@0"),
            (packet("late", 2, 3, BIG), "segment-c@0"),
            (packet("late", 3, 3, BIG), "orphan-b@0"),
        ),
        INLINE_LIMIT,
    )
    assert [o.status for o in result.outcomes] == ["stale", "staged", "stale"]
    assert catalog.received_seqs("late") == [2]

    catalog.mark_removed([("late", "image-a")])
    assert catalog.objects_to_remove() == [("late", "orphan-b")]

    stage(catalog, packet("late", 1, 3, BIG), packet("late", 3, 3, BIG))
    assert catalog.claim("late", "worker-a", 30)
    record = catalog.get("late")
    assert record is not None
    assert catalog.finish(record, "worker-a", state=STORED, size=3 * len(BIG))
    assert catalog.objects_to_remove() == []
    assert catalog.db.query("SELECT COUNT(*) FROM discarded_objects")[0][0] == 0


def test_an_expiry_checks_again_that_the_file_is_idle(catalog: Catalog) -> None:
    """A file found stale, then sent a packet before the expiry commits,
    stays receiving with its chunks."""
    stage(catalog, packet("busy", 1, 3, BIG))
    cutoff = time.time() + 0.5
    assert catalog.stale_files(cutoff) == ["busy"]
    time.sleep(0.6)
    stage(catalog, packet("busy", 2, 3, BIG))

    assert catalog.expire(cutoff, {"busy": ["00000001-x"]}) == []
    assert catalog.received_seqs("busy") == [1, 2]
    assert catalog.objects_to_remove() == []


def test_leftovers_are_discarded_only_while_the_file_stays_expired(
    catalog: Catalog,
) -> None:
    """What a sweep finds in an expired file's folder is discarded, again if
    it was removed and written since; nothing once the file started over."""
    stage(catalog, packet("gone", 1, 2, BIG))
    assert catalog.expire(time.time() + 1) == ["gone"]
    assert catalog.objects_to_remove() == [("gone", "00000001-x")]
    catalog.mark_removed([("gone", "00000001-x")])

    assert catalog.discard_leftovers("gone", ["00000001-x", "crashed-y"])
    assert catalog.objects_to_remove() == [
        ("gone", "00000001-x"),
        ("gone", "crashed-y"),
    ]

    stage(catalog, packet("gone", 2, 2, BIG))
    assert not catalog.discard_leftovers("gone", ["00000002-x"])
    assert ("gone", "00000002-x") not in catalog.objects_to_remove()


def stage_in_a_thread(
    catalog: Catalog, chunk: Packet, staged_object: str
) -> tuple[threading.Thread, dict[str, Any]]:
    """Stage one chunk, named into `staged_object`, in a thread of its own;
    the result lands in the dict under "result"."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["result"] = catalog.stage(
            staged_as((chunk, f"{staged_object}@0")), INLINE_LIMIT
        )

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_staging_waits_for_an_expiry_in_progress_and_sees_it(
    catalog: Catalog, catalog_url: str
) -> None:
    """A batch staged while another connection expires its file is judged
    by the expiry's outcome, not by the state before it."""
    stage(catalog, packet("raced", 1, 3, BIG))
    stale_at = time.time() + 1
    holding, release = threading.Event(), threading.Event()

    def expire_slowly() -> None:
        other = Catalog(open_database(catalog_url))
        try:
            with other.db.transaction() as txn:
                assert other._expire_file(txn, "raced", stale_at, ["image-r"], 0.0)
                holding.set()
                release.wait(timeout=10)
        finally:
            other.close()

    expiring = threading.Thread(target=expire_slowly)
    expiring.start()
    assert holding.wait(timeout=10)
    late = packet("raced", 2, 3, BIG)
    stager, staging = stage_in_a_thread(catalog, late, "image-r")
    stager.join(timeout=0.5)
    assert stager.is_alive(), "staging did not wait for the expiry's lock"
    release.set()
    expiring.join(timeout=10)
    stager.join(timeout=10)

    assert [o.status for o in staging["result"].outcomes] == ["stale"]
    record = catalog.get("raced")
    assert record is not None
    assert (record.state, record.received) == (RECEIVING, 0)


def test_an_expiry_waits_for_a_batch_that_read_its_file_and_spares_it(
    catalog: Catalog, catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expiry that comes while a batch is between reading its file's row
    and recording its chunks waits for it, then finds the file busy."""
    stage(catalog, packet("raced", 1, 3, BIG))
    time.sleep(0.05)
    stale_at = time.time()
    time.sleep(0.05)
    reading, release = threading.Event(), threading.Event()
    record_chunk = catalog._stage_chunk

    def record_after_a_pause(*args: Any) -> Any:
        reading.set()
        release.wait(timeout=10)
        return record_chunk(*args)

    monkeypatch.setattr(catalog, "_stage_chunk", record_after_a_pause)
    late = packet("raced", 2, 3, BIG)
    stager, staging = stage_in_a_thread(catalog, late, "segment-s")
    assert reading.wait(timeout=10)
    expired: list[list[str]] = []

    def expire_meanwhile() -> None:
        other = Catalog(open_database(catalog_url))
        try:
            expired.append(other.expire(stale_at, {"raced": ["segment-s"]}))
        finally:
            other.close()

    expiring = threading.Thread(target=expire_meanwhile)
    expiring.start()
    expiring.join(timeout=0.5)
    assert expiring.is_alive(), "the expiry did not wait for the batch's lock"
    release.set()
    stager.join(timeout=10)
    expiring.join(timeout=10)

    assert expired == [[]]
    assert [o.status for o in staging["result"].outcomes] == ["staged"]
    assert catalog.received_seqs("raced") == [1, 2]


def test_a_catalog_of_the_first_schema_is_migrated_with_its_files(
    catalog_url: str,
) -> None:
    """Migrations 2 and 3 add the expiry's bookkeeping and the XXH128 to a
    catalog in use; its files keep working."""
    database = open_database(catalog_url)
    try:
        with database.transaction() as txn:
            txn.execute(
                "CREATE TABLE schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            for statement in (
                MIGRATIONS[0][1].format(blob=database.blob_type).split(";")
            ):
                if statement.strip():
                    txn.execute(statement)
            txn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (1, 0)"
            )
            txn.execute(
                "INSERT INTO files (file_id, type, total_seq, state, created_at, "
                "updated_at) VALUES ('old', 'image', 2, 'receiving', 0, 0)"
            )
    finally:
        database.close()

    catalog = Catalog.open(catalog_url)
    try:
        assert catalog.migrate() == []
        versions = catalog.db.query("SELECT version FROM schema_migrations")
        assert sorted(row[0] for row in versions) == [1, 2, 3]
        assert catalog.expire(time.time()) == ["old"]
        assert stage(catalog, packet("old", 1, 2)) == ([(1, "staged")], set())
        stage(catalog, packet("old", 2, 2, file_xxh128="ab" * 16))
        record = catalog.get("old")
        assert record is not None
        assert record.expected_xxh128 == "ab" * 16
    finally:
        catalog.close()


def test_listing_filters_and_pages(catalog: Catalog) -> None:
    """Files are listed newest first, filtered by type, device, state and
    time, and paged without gaps or repeats."""
    for index in range(5):
        stage(catalog, packet(f"cam-{index}", 1, 2, kind="image", device_id="cam"))
    boundary = time.time()
    for index in range(4):
        stage_whole(catalog, f"lidar-{index}", kind="video", device_id="lidar")
    assert catalog.claim("lidar-0", "worker-a", 30)

    newest_first = [f"lidar-{i}" for i in reversed(range(4))] + [
        f"cam-{i}" for i in reversed(range(5))
    ]
    assert [r.file_id for r in catalog.list_files()] == newest_first
    pages = [
        [r.file_id for r in catalog.list_files(limit=4, offset=start)]
        for start in (0, 4, 8)
    ]
    assert pages == [newest_first[0:4], newest_first[4:8], newest_first[8:]]

    def ids(**filters: Any) -> set[str]:
        return {r.file_id for r in catalog.list_files(**filters)}

    assert ids(type="video") == {f"lidar-{i}" for i in range(4)}
    assert ids(device_id="cam") == {f"cam-{i}" for i in range(5)}
    assert ids(state=RECEIVING, type="image") == {f"cam-{i}" for i in range(5)}
    assert ids(state=RECEIVING, type="video") == {f"lidar-{i}" for i in (1, 2, 3)}
    assert ids(state=ASSEMBLING) == {"lidar-0"}
    assert ids(since=boundary) == {f"lidar-{i}" for i in range(4)}
    assert ids(until=boundary) == {f"cam-{i}" for i in range(5)}
    assert ids(device_id="nobody") == set()


def test_missing_ranges_follow_the_staged_chunks(catalog: Catalog) -> None:
    """The seqs not yet received are reported as [first, last] runs."""
    stage(catalog, *(packet("gappy", seq, 9) for seq in (1, 2, 5, 7)))

    received = catalog.received_seqs("gappy")
    assert received == [1, 2, 5, 7]
    assert missing_ranges(received, 9) == [[3, 4], [6, 6], [8, 9]]
    assert missing_ranges([], 3) == [[1, 3]]
    assert missing_ranges([1, 2, 3], 3) == []


def test_unsent_events_are_found_until_marked_sent(catalog: Catalog) -> None:
    """A finished file's event is due until it is marked sent."""
    stage_whole(catalog, "f")
    assert catalog.claim("f", "worker-a", 30)
    record = catalog.get("f")
    assert record is not None
    assert catalog.finish(record, "worker-a", state=STORED)

    assert [r.file_id for r in catalog.events_unsent(time.time() + 1)] == ["f"]
    catalog.mark_events_sent(["f"])
    assert catalog.events_unsent(time.time() + 1) == []


def test_a_commit_that_skips_the_disk_wait_leaves_later_ones_durable(
    catalog: Catalog,
) -> None:
    """Marking events sent does not wait for the disk; what follows it does."""
    stage_whole(catalog, "f")
    catalog.mark_events_sent(["f"])

    if catalog.db.dialect == "sqlite":
        setting = catalog.db.query("PRAGMA synchronous")[0][0]
        assert setting == 2  # FULL
    else:
        setting = catalog.db.query("SHOW synchronous_commit")[0][0]
        assert setting == "on"
    assert catalog.db.query("SELECT event_sent FROM files WHERE file_id = 'f'") == [
        (1,)
    ]


def run_migrate(catalog_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "datahaul", "migrate", "--catalog-url", catalog_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", ENV_PREFIX + "DATA_DIR": "/nonexistent"},
    )


def test_migrate_command_applies_then_reports_current(catalog_url: str) -> None:
    """`datahaul migrate` applies the migrations, then says the schema is current."""
    first = run_migrate(catalog_url)
    assert first.returncode == 0, first.stderr
    latest = max(v for v, _ in MIGRATIONS)
    assert "applied migration(s) 1" in first.stdout
    assert f"now at {latest}" in first.stdout

    second = run_migrate(catalog_url)
    assert second.returncode == 0, second.stderr
    assert f"is current at version {latest}" in second.stdout


def test_migrate_command_refuses_a_newer_schema(catalog: Catalog, catalog_url) -> None:
    """A database migrated by a newer datahaul is reported, with exit code 5."""
    with catalog.db.transaction() as txn:
        txn.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
            (999, time.time()),
        )

    result = run_migrate(catalog_url)
    assert result.returncode == 5
    assert "schema version 999, newer than" in result.stderr


def test_migrate_command_names_an_unreachable_database() -> None:
    """An unreachable PostgreSQL is an error naming it, with the password hidden."""
    result = run_migrate("postgresql://postgres:hunter2@127.0.0.1:1/nothing")

    assert result.returncode == 4
    assert "postgres:***@127.0.0.1:1/nothing" in result.stderr
    assert "hunter2" not in result.stderr


def test_small_text_files_are_stored_in_the_staging_transaction(
    catalog: Catalog,
) -> None:
    """A small text file completed by a batch is stored by that same
    transaction, verified, with no lease and no chunk rows left."""
    text = [
        Packet(type="text", file_id="quick", seq=s, total_seq=2, data=b"ab" * s)
        for s in (1, 2)
    ]
    result = catalog.stage([(p, None) for p in text], INLINE_LIMIT, 1024)

    assert result.complete == set()
    [record] = result.finished
    assert (record.state, record.size) == ("stored", 6)
    assert catalog.text("quick") == b"ababab"
    assert catalog.received_seqs("quick") == []


def test_a_small_text_file_with_the_wrong_digest_fails(catalog: Catalog) -> None:
    """The in-transaction store checks the sender's SHA-256 like any other."""
    packet = Packet(
        type="text", file_id="liar", seq=1, total_seq=1, data=b"x", file_sha256="0" * 64
    )
    result = catalog.stage([(packet, None)], INLINE_LIMIT, 1024)

    assert result.finished[0].state == "failed"
    assert catalog.text("liar") is None


def test_a_whole_text_file_in_one_batch_is_recorded_like_any_other(
    catalog: Catalog,
) -> None:
    """A text file whose packets all come in one batch is stored with the
    first packet's fields, a repeated packet counts as a duplicate, and a
    late copy finds the file stored."""
    fields: dict[str, Any] = {
        "file_name": "drive.log",
        "device_id": "robot-7",
        "metadata": {"route": 12},
    }
    text = [packet("whole", s, 2, b"ab" * s, "text", **fields) for s in (1, 2, 2)]

    result = catalog.stage([(p, None) for p in text], INLINE_LIMIT, 1024)

    assert [(o.packet.seq, o.status) for o in result.outcomes] == [
        (1, "staged"),
        (2, "staged"),
        (2, "duplicate"),
    ]
    [record] = result.finished
    assert catalog.get("whole") == record
    assert (record.state, record.received, record.size) == (STORED, 2, 6)
    assert (record.device_id, record.metadata) == ("robot-7", {"route": 12})
    assert catalog.text("whole") == b"ababab"
    late = catalog.stage([(text[0], None)], INLINE_LIMIT, 1024)
    assert [o.status for o in late.outcomes] == ["duplicate"]
    assert late.finished == []


def test_a_text_file_split_over_batches_is_stored_by_the_one_that_completes_it(
    catalog: Catalog,
) -> None:
    """When part of a text file was staged before, the batch that brings the
    rest stores it from the staged chunks, the repeat counted once."""
    first = packet("split", 1, 2, b"ab", "text")
    second = packet("split", 2, 2, b"cd", "text")
    catalog.stage([(first, None)], INLINE_LIMIT, 1024)

    result = catalog.stage([(first, None), (second, None)], INLINE_LIMIT, 1024)

    assert [(o.packet.seq, o.status) for o in result.outcomes] == [
        (1, "duplicate"),
        (2, "staged"),
    ]
    assert [r.state for r in result.finished] == [STORED]
    assert catalog.text("split") == b"abcd"
    assert catalog.received_seqs("split") == []
