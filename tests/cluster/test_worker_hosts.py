"""Workers on several hosts share only PostgreSQL and the blob store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster_checks import (
    HostDirs,
    Robots,
    assert_stored_once,
    dead_letters,
    make_sources,
    wait_outbox_empty,
)

from datahaul.faults.cluster import RabbitCluster
from datahaul.faults.processes import ServiceProcess

pytestmark = pytest.mark.timeout(240)


async def test_workers_on_three_hosts_share_only_postgres_and_the_store(
    whole_cluster: RabbitCluster,
    gateway_factory: Callable[..., ServiceProcess],
    worker_factory: Callable[..., ServiceProcess],
    host_dirs: HostDirs,
    fresh_pg_url: str,
    shared_store: Path,
    tmp_path: Path,
) -> None:
    """Workers with their own local directories, one killed mid-transfer and
    replaced by a new host, store every file once and keep nothing locally."""
    gateway = gateway_factory()
    workers = [
        worker_factory(
            "all",
            env={
                **host_dirs.env(),
                "DATAHAUL_AMQP_URL": whole_cluster.amqp_url(first=index),
            },
        )
        for index in range(3)
    ]

    sources = make_sources(tmp_path / "robot", 15, seed=5)
    robots = Robots(gateway.url or "", [sources[i::3] for i in range(3)])

    async def replace_a_host() -> None:
        await asyncio.to_thread(workers[0].kill9)
        await asyncio.to_thread(worker_factory, "all", env=host_dirs.env())

    results = await robots.run(fault=replace_a_host, after=5)

    assert_stored_once(fresh_pg_url, sources, results, shared_store / "staging")
    wait_outbox_empty(gateway.url or "")
    assert await dead_letters(whole_cluster.first.url()) == 0
    for host in host_dirs.made:
        assert [p for p in host.rglob("*") if p.is_file()] == [], host
    storing = [w for w in workers[1:] if "file.stored" in w.log_path.read_text()]
    assert len(storing) >= 2, "the surviving hosts did not share the work"
