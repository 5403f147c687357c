"""Fixtures for tests against a real three-node RabbitMQ cluster on this machine.

The cluster boots once (about half a minute), for the first test here that
needs it, and is removed after the last test of this folder. Each test
starts with every node running, datahaul's queues declared afresh through
node 1 (so that node 1 leads them), a PostgreSQL database of
its own, and a shared directory that plays the blob and staging store of a
center whose workers run on several hosts. The machine's own RabbitMQ on
5672 is not used here.

`datahaul_env` is redefined here, so the gateway and worker factories of
tests/conftest.py start their processes against the cluster: DATAHAUL_AMQP_URL
lists all three nodes starting with node 2, so that a process connects to
node 2 while node 1 leads the queues.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cluster.cluster_checks import HostDirs, declare_through
from datahaul.broker import topology
from datahaul.config import Settings
from datahaul.faults import HarnessError
from datahaul.faults.cluster import RabbitCluster
from datahaul.faults.processes import run_coroutine
from datahaul.faults.rabbit import reset_topology

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
PG_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/"
CONFIRM_TIMEOUT = "5"
# Whom the processes try first: not node 1, which leads the queues.
PROCESS_NODE = 1
HERE = Path(__file__).parent


class Booted:
    """The run's cluster while tests of this folder run; None before and after."""

    cluster: RabbitCluster | None = None


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> RabbitCluster:
    """Three RabbitMQ nodes joined into one cluster, booted by the first test
    that asks and removed after the last test of this folder, so that the
    rest of the suite does not run beside three idle brokers."""
    if Booted.cluster is None:
        if (
            shutil.which("rabbitmq-server") is None
            and not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()
        ):
            message = "rabbitmq-server is not installed; the cluster tests need it"
            if IN_CI:
                pytest.fail(f"{message} (CI=true, so this is a failure)", pytrace=False)
            pytest.skip(message)
        root = tmp_path_factory.mktemp("rabbit-cluster")
        Booted.cluster = RabbitCluster(root).start()
    return Booted.cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    # After the test's own fixtures (its gateway and workers) are torn down.
    result = yield
    leaving = nextitem is None or Path(nextitem.path).parent != HERE
    if leaving and Booted.cluster is not None:
        Booted.cluster.close()
        Booted.cluster = None
    return result


@pytest.fixture
def whole_cluster(cluster: RabbitCluster) -> RabbitCluster:
    """The cluster with every node up and datahaul's queues new, led by node 1."""
    cluster.ensure_all_running()
    run_coroutine(reset_topology(cluster.first.url()))
    run_coroutine(declare_through(cluster.first.url(), Settings()))
    for queue in topology.QUEUES.values():
        leader = cluster.queue_leader(queue)
        if leader is not cluster.first:
            raise HarnessError(f"{queue} is led by {leader.nodename}, not node 1")
    return cluster


@pytest.fixture
def fresh_pg_url(postgres: None) -> Iterator[str]:
    """A PostgreSQL database of this test's own, dropped at the end."""
    name = f"datahaul_cluster_{secrets.token_hex(4)}"
    _pg_admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield PG_SERVER_URL + name
    _pg_admin(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    )


def _pg_admin(statement: sql.Composed) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(statement)


@pytest.fixture
def shared_store(tmp_path: Path) -> Path:
    """The directory every worker host shares: blobs and staged chunks."""
    path = tmp_path / "shared"
    (path / "blobs").mkdir(parents=True)
    (path / "staging").mkdir()
    return path


@pytest.fixture
def host_dirs(tmp_path: Path) -> HostDirs:
    """Local data directories, one per simulated worker host."""
    return HostDirs(tmp_path / "hosts")


@pytest.fixture
def datahaul_env(
    whole_cluster: RabbitCluster,
    data_dir: Path,
    gateway_port: int,
    fresh_pg_url: str,
    shared_store: Path,
) -> dict[str, str]:
    """Settings for processes on the cluster, PostgreSQL and the shared store."""
    return {
        "DATAHAUL_AMQP_URL": whole_cluster.amqp_url(first=PROCESS_NODE),
        "DATAHAUL_DATA_DIR": str(data_dir),
        "DATAHAUL_CATALOG_URL": fresh_pg_url,
        "DATAHAUL_BLOB_URL": (shared_store / "blobs").as_uri(),
        "DATAHAUL_STAGING_URL": (shared_store / "staging").as_uri(),
        "DATAHAUL_GATEWAY_PORT": str(gateway_port),
        "DATAHAUL_GATEWAY_URL": f"http://127.0.0.1:{gateway_port}",
        "DATAHAUL_CONFIRM_TIMEOUT": CONFIRM_TIMEOUT,
        # Sweeps often, so that a file whose finalizer died is taken over soon.
        "DATAHAUL_SWEEP_INTERVAL": "1",
        "DATAHAUL_LEASE_SECONDS": "10",
    }
