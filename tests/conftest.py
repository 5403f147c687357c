"""Fixtures every test can use: its own broker vhost and database, processes, faults.

Each run of the suite gets a RabbitMQ vhost `datahaul-test-<random>` and a
PostgreSQL database `datahaul_test_<random>`, both removed at the end, so
that runs on one machine never see each other's queues or rows. Within a run,
`amqp_url` hands each test a vhost with datahaul's topology deleted, so that
no packet left by an earlier test reaches a later test's workers.

Without the broker or the database, tests that need them are skipped on a
developer's machine and fail in CI (CI=true), where a skip would hide that
nothing was tested.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from datahaul.faults.processes import (
    ServiceProcess,
    free_port,
    run_coroutine,
)
from datahaul.faults.proxy import FaultProxy
from datahaul.faults.rabbit import (
    broker_accepts,
    create_vhost,
    delete_vhost,
    reset_topology,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BROKER_ROOT_URL = "amqp://guest:guest@127.0.0.1:5672/"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
PG_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/"
TEST_CONFIRM_TIMEOUT = "5"

PROCESSES = pytest.StashKey[list[ServiceProcess]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "broker_outage: stops and restarts the machine's RabbitMQ; slow, and "
        "every client on the machine sees the outage (deselect with "
        "-m 'not broker_outage')",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # A failing test shows what its datahaul processes logged, not just that
    # it failed.
    report = yield
    if report.failed:
        for process in item.stash.get(PROCESSES, []):
            report.sections.append(
                (f"{process.name} log ({process.log_path})", process.log_tail(60))
            )
    return report


def missing_service(message: str) -> NoReturn:
    """Skip on a developer's machine; fail in CI, where a skip hides a gap."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true, so this is a failure)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def rabbitmq() -> None:
    """RabbitMQ on 127.0.0.1:5672 with rabbitmqctl, or a skip (a failure in CI)."""
    if shutil.which("rabbitmqctl") is None:
        missing_service("rabbitmqctl is not installed; install rabbitmq-server")
    if not broker_accepts():
        missing_service(
            "RabbitMQ does not accept connections on 127.0.0.1:5672; start it "
            "with `rabbitmq-server -detached && rabbitmqctl await_startup`"
        )


@pytest.fixture(scope="session")
def broker_vhost(rabbitmq: None) -> Iterator[str]:
    """A vhost of this run's own, deleted with everything in it at the end."""
    name = f"datahaul-test-{secrets.token_hex(4)}"
    create_vhost(name)
    yield name
    delete_vhost(name)


@pytest.fixture(scope="session")
def session_amqp_url(broker_vhost: str) -> str:
    """The broker URL for this run's vhost, as it is, with whatever it holds."""
    return BROKER_ROOT_URL + quote(broker_vhost, safe="")


@pytest.fixture
def amqp_url(session_amqp_url: str) -> str:
    """The run's vhost with datahaul's queues and exchanges deleted before the test.

    Queues a test declares under other names are its own to delete (or to
    declare exclusive or auto-delete).
    """
    run_coroutine(reset_topology(session_amqp_url))
    return session_amqp_url


@pytest.fixture(scope="session")
def postgres() -> None:
    """PostgreSQL on 127.0.0.1:5432, or a skip (a failure in CI)."""
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        missing_service(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}; start it with "
            "`pg_ctlcluster --skip-systemctl-redirect 15 main start`"
        )


@pytest.fixture(scope="session")
def pg_url(postgres: None) -> Iterator[str]:
    """A database of this run's own, dropped (connections and all) at the end."""
    name = f"datahaul_test_{secrets.token_hex(4)}"
    _pg_admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield PG_SERVER_URL + name
    _pg_admin(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    )


def _pg_admin(statement: sql.Composed) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(statement)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty DATAHAUL_DATA_DIR for this test."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Where this test's datahaul processes write their logs."""
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def free_tcp_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    return free_port()


@pytest.fixture
def gateway_port() -> int:
    """The port this test's gateway listens on (and its sender points at)."""
    return free_port()


@pytest.fixture
def datahaul_env(amqp_url: str, data_dir: Path, gateway_port: int) -> dict[str, str]:
    """DATAHAUL_* settings for this test's processes: its vhost, data and port.

    The catalog is the embedded SQLite one under data_dir; for PostgreSQL use
    `datahaul_pg_env`. Confirms time out sooner than in production, so that
    tests of stalled links finish quickly.
    """
    return {
        "DATAHAUL_AMQP_URL": amqp_url,
        "DATAHAUL_DATA_DIR": str(data_dir),
        "DATAHAUL_CATALOG_URL": f"sqlite:///{data_dir / 'catalog.db'}",
        "DATAHAUL_GATEWAY_PORT": str(gateway_port),
        "DATAHAUL_GATEWAY_URL": f"http://127.0.0.1:{gateway_port}",
        "DATAHAUL_CONFIRM_TIMEOUT": TEST_CONFIRM_TIMEOUT,
    }


@pytest.fixture
def datahaul_pg_env(datahaul_env: dict[str, str], pg_url: str) -> dict[str, str]:
    """datahaul_env with the catalog and text store in this run's PostgreSQL."""
    return {**datahaul_env, "DATAHAUL_CATALOG_URL": pg_url}


@pytest.fixture
def fault_proxy(amqp_url: str) -> Iterator[FaultProxy]:
    """A proxy in front of the broker, passing bytes until told otherwise."""
    with FaultProxy.for_url(amqp_url) as proxy:
        yield proxy


GatewayFactory = Callable[..., ServiceProcess]
WorkerFactory = Callable[..., ServiceProcess]


@pytest.fixture
def gateway_factory(
    request: pytest.FixtureRequest,
    datahaul_env: dict[str, str],
    gateway_port: int,
    log_dir: Path,
) -> Iterator[GatewayFactory]:
    """Start gateways (each killed at the end); see `start` for the options."""
    started: list[ServiceProcess] = []

    def start(
        *,
        env: dict[str, str] | None = None,
        proxy: FaultProxy | None = None,
        port: int | None = None,
        name: str | None = None,
        wait: bool = True,
        healthy_only: bool = True,
    ) -> ServiceProcess:
        """A gateway on datahaul_env plus env, through proxy if given, ready."""
        merged = {**datahaul_env, **(env or {})}
        if proxy is not None:
            merged["DATAHAUL_AMQP_URL"] = proxy.url_for(merged["DATAHAUL_AMQP_URL"])
        process = ServiceProcess.gateway(
            port or gateway_port,
            merged,
            log_dir,
            name=name or f"gateway-{len(started) + 1}",
            healthy_only=healthy_only,
        )
        _track(request, started, process)
        process.start()
        if wait:
            process.wait_ready()
        return process

    yield start
    _kill_all(started)


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> ServiceProcess:
    """A ready gateway on gateway_port with this test's datahaul_env."""
    return gateway_factory(name="gateway")


@pytest.fixture
def worker_factory(
    request: pytest.FixtureRequest,
    datahaul_env: dict[str, str],
    log_dir: Path,
) -> Iterator[WorkerFactory]:
    """Start workers (each killed at the end); each waits for its own consumer."""
    started: list[ServiceProcess] = []

    def live_consumers(queue: str) -> int:
        return sum(
            1 for process in started if process.is_running and queue in process.queues
        )

    def start(
        kind: str = "all",
        *,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> ServiceProcess:
        """A worker of `kind` on datahaul_env plus env, consuming when returned."""
        process = ServiceProcess.worker(
            kind,
            {**datahaul_env, **(env or {})},
            log_dir,
            name=f"worker-{kind}-{len(started) + 1}",
            consumers_expected=live_consumers,
        )
        _track(request, started, process)
        process.start()
        if wait:
            process.wait_ready()
        return process

    yield start
    _kill_all(started)


def _track(
    request: pytest.FixtureRequest,
    started: list[ServiceProcess],
    process: ServiceProcess,
) -> None:
    started.append(process)
    request.node.stash.setdefault(PROCESSES, []).append(process)


def _kill_all(processes: list[ServiceProcess]) -> None:
    for process in processes:
        if process.is_running:
            process.kill9()
