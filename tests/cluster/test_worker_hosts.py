"""Workers on several hosts share only PostgreSQL and the blob store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.cluster_checks import (
    MIX,
    HostDirs,
    Robots,
    assert_stored_once,
    dead_letters,
    make_sources,
    packet_count,
    post_packets,
    sent_files,
    wait_outbox_empty,
    wait_received,
)
from datahaul.faults.cluster import RabbitCluster
from datahaul.faults.processes import ServiceProcess

pytestmark = pytest.mark.timeout(240)

VIDEOS_ONLY = MIX[:1]


async def test_workers_on_several_hosts_share_only_postgres_and_the_store(
    whole_cluster: RabbitCluster,
    gateway_factory: Callable[..., ServiceProcess],
    worker_factory: Callable[..., ServiceProcess],
    host_dirs: HostDirs,
    fresh_pg_url: str,
    shared_store: Path,
    tmp_path: Path,
) -> None:
    """Files half staged by a worker on one host, which then dies, are finished
    by workers on other hosts (one of them killed mid-transfer and replaced);
    every file is stored once and no host keeps anything on its own disk."""
    gateway = gateway_factory()
    url = gateway.url or ""
    first_host = worker_factory("all", env=host_dirs.env())

    begun = make_sources(tmp_path / "begun", 2, seed=7, mix=VIDEOS_ONLY)
    halves = {source: packet_count(source) // 2 for source in begun}
    for source, half in halves.items():
        await asyncio.to_thread(post_packets, url, source, range(1, half + 1))
    wait_received(
        fresh_pg_url,
        {s.file_id: half for s, half in halves.items()},
    )
    first_host.kill9()

    others = [worker_factory("all", env=host_dirs.env()) for _ in range(2)]
    for source, half in halves.items():
        rest = range(half + 1, packet_count(source) + 1)
        await asyncio.to_thread(post_packets, url, source, rest)

    sources = make_sources(tmp_path / "robot", 12, seed=5)
    robots = Robots(url, [sources[i::3] for i in range(3)])

    async def replace_a_host() -> None:
        await asyncio.to_thread(others[0].kill9)
        await asyncio.to_thread(worker_factory, "all", env=host_dirs.env())

    results = await robots.run(fault=replace_a_host, after=4)

    files = {
        **sent_files(sources, results),
        **{source.file_id: source for source in begun},
    }
    assert_stored_once(fresh_pg_url, files, shared_store / "staging")
    wait_outbox_empty(url)
    assert await dead_letters(whole_cluster.first.url()) == 0
    assert len(host_dirs.made) == 4
    for host in host_dirs.made:
        assert [p for p in host.rglob("*") if p.is_file()] == [], host
