"""A real RabbitMQ cluster of three nodes on this machine, for failover tests.

    with RabbitCluster(tmp_path) as cluster:   # booted and joined
        env["DATAHAUL_AMQP_URL"] = cluster.amqp_url(first=1)
        leader = cluster.queue_leader("video_data_queue")
        cluster.stop_node(leader)               # gone, like a crashed host
        cluster.start_node(leader)              # back, and in the cluster again

Each node is an Erlang VM of its own with its own name, AMQP and
distribution ports and data directories, all on 127.0.0.1 and under one
temporary directory, which is also the HOME that holds the cluster's Erlang
cookie. The nodes read none of /etc/rabbitmq, so the machine's own broker
(rabbit@localhost on 5672) is neither read from nor touched; only the
machine's epmd is shared, as every Erlang node on a host shares it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import structlog

from datahaul.faults import HarnessError

log = structlog.get_logger("datahaul.faults")

HOST = "127.0.0.1"
# The packaged scripts under /usr/sbin switch to the rabbitmq user and its
# HOME, which would lose this cluster's cookie and directories.
SCRIPT_DIRS = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/local/lib/rabbitmq/bin"))
LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"
# rabbitmqctl takes its own distribution port from this range.
CLI_DIST_PORTS = range(35672, 35683)
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
CTL_TIMEOUT = 60.0

_live: weakref.WeakSet[RabbitCluster] = weakref.WeakSet()


@dataclass
class ClusterNode:
    """One node of the cluster: its name, ports, directories and OS process."""

    index: int
    name: str
    amqp_port: int
    dist_port: int
    base: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0
    frozen: bool = False

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    @property
    def log_path(self) -> Path:
        """Everything the node printed on its console, across restarts."""
        return self.base / "console.log"

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def url(self, vhost: str = "/") -> str:
        return f"amqp://guest:guest@{HOST}:{self.amqp_port}/{quote(vhost, safe='')}"

    def accepts(self) -> bool:
        """Whether the node's AMQP listener takes connections right now."""
        try:
            with socket.create_connection((HOST, self.amqp_port), timeout=0.5):
                return True
        except OSError:
            return False

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(nothing printed)"
        return "\n".join(text.splitlines()[-lines:])


class RabbitCluster:
    """Boots, joins, faults and removes a RabbitMQ cluster under one directory."""

    def __init__(
        self, root: Path | None = None, size: int = 3, prefix: str = "dh"
    ) -> None:
        if size < 1:
            raise HarnessError(f"a cluster needs at least one node, not {size}")
        self._scripts = _script_dir()
        self._own_root = root is None
        self.root = (
            Path(tempfile.mkdtemp(prefix="datahaul-cluster-")) if root is None else root
        )
        self.root.mkdir(parents=True, exist_ok=True)
        # A name of this run's own, so that a node left over by a killed run
        # (still registered with epmd) cannot block a new one.
        token = secrets.token_hex(3)
        ports = _free_ports(2 * size)
        self.nodes = [
            ClusterNode(
                index=i,
                name=f"{prefix}{i + 1}-{token}",
                amqp_port=ports[2 * i],
                dist_port=ports[2 * i + 1],
                base=self.root / f"{prefix}{i + 1}",
            )
            for i in range(size)
        ]
        self._closed = False

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def first(self) -> ClusterNode:
        return self.nodes[0]

    def start(self) -> RabbitCluster:
        """Boot every node and join them into one cluster; undo it all on failure."""
        _live.add(self)
        started = time.monotonic()
        try:
            self._write_cookie()
            for node in self.nodes:
                self._write_node_files(node)
                self._launch(node)
            for node in self.nodes:
                self._wait_booted(node)
            for node in self.nodes[1:]:
                self._join(node)
            self._check_membership()
        except BaseException:
            self.close()
            raise
        log.info(
            "cluster.started",
            nodes=[n.nodename for n in self.nodes],
            ports=[n.amqp_port for n in self.nodes],
            seconds=round(time.monotonic() - started, 1),
        )
        return self

    def close(self) -> None:
        """Stop every node (politely, then by force) and remove the directory."""
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            self.thaw_node(node)
            if node.is_running:
                with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
                    self.ctl(node, "stop", timeout=30)
            self._reap(node, timeout=15)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            for node in self.nodes:
                shutil.rmtree(node.base / "mnesia", ignore_errors=True)
        _live.discard(self)
        log.info("cluster.removed", root=str(self.root))

    def node(self, which: int | str | ClusterNode) -> ClusterNode:
        """A node by index, by name or nodename, or the node itself."""
        if isinstance(which, ClusterNode):
            return which
        for node in self.nodes:
            if which in (node.index, node.name, node.nodename):
                return node
        names = ", ".join(n.nodename for n in self.nodes)
        raise HarnessError(f"no node {which!r} in this cluster; it has {names}")

    def urls(self, vhost: str = "/", first: int | str | ClusterNode = 0) -> list[str]:
        """Every node's AMQP URL, starting with `first` and going round."""
        start = self.node(first).index
        order = self.nodes[start:] + self.nodes[:start]
        return [node.url(vhost) for node in order]

    def amqp_url(self, vhost: str = "/", first: int | str | ClusterNode = 0) -> str:
        """The comma-separated form of urls(), as DATAHAUL_AMQP_URL takes it."""
        return ",".join(self.urls(vhost, first))

    def running(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.is_running]

    def stop_node(self, which: int | str | ClusterNode) -> ClusterNode:
        """Stop one node for good (`rabbitmqctl stop`): its process is gone after."""
        node = self.node(which)
        began = time.monotonic()
        self.ctl(node, "stop", timeout=STOP_TIMEOUT)
        self._reap(node, timeout=STOP_TIMEOUT)
        log.info(
            "cluster.node_stopped",
            node=node.nodename,
            seconds=round(time.monotonic() - began, 2),
        )
        return node

    def kill_node(self, which: int | str | ClusterNode) -> ClusterNode:
        """SIGKILL one node: no goodbye to its clients or its peers."""
        node = self.node(which)
        self._reap(node, timeout=0)
        node.frozen = False
        log.info("cluster.node_killed", node=node.nodename)
        return node

    def freeze_node(self, which: int | str | ClusterNode) -> ClusterNode:
        """SIGSTOP one node: its sockets stay open but nothing answers, as on a
        host that hangs or a link that silently drops everything."""
        node = self.node(which)
        if not node.is_running or node.process is None:
            raise HarnessError(f"{node.nodename} is not running; nothing to freeze")
        os.killpg(node.process.pid, signal.SIGSTOP)
        node.frozen = True
        log.info("cluster.node_frozen", node=node.nodename)
        return node

    def thaw_node(self, which: int | str | ClusterNode) -> ClusterNode:
        """SIGCONT a frozen node; a node that is not frozen is left alone."""
        node = self.node(which)
        if node.frozen and node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGCONT)
            log.info("cluster.node_thawed", node=node.nodename)
        node.frozen = False
        return node

    def start_node(self, which: int | str | ClusterNode) -> ClusterNode:
        """Boot a stopped node again; it rejoins the cluster from its own data."""
        node = self.node(which)
        if node.is_running:
            raise HarnessError(f"{node.nodename} already runs as pid {node.process}")
        began = time.monotonic()
        self._launch(node)
        self._wait_booted(node)
        log.info(
            "cluster.node_started",
            node=node.nodename,
            seconds=round(time.monotonic() - began, 2),
        )
        return node

    def ensure_all_running(self) -> None:
        """Thaw or start whichever nodes are not serving, so that a test begins
        with the whole cluster."""
        for node in self.nodes:
            self.thaw_node(node)
            if not node.is_running:
                self.start_node(node)

    def ctl(
        self, node: int | str | ClusterNode, *args: str, timeout: float = CTL_TIMEOUT
    ) -> str:
        """`rabbitmqctl -n NODE ARGS...` against one node of this cluster."""
        return self._run_tool("rabbitmqctl", self.node(node), args, timeout)

    def queues_tool(
        self, node: int | str | ClusterNode, *args: str, timeout: float = CTL_TIMEOUT
    ) -> str:
        """`rabbitmq-queues -n NODE ARGS...` against one node of this cluster."""
        return self._run_tool("rabbitmq-queues", self.node(node), args, timeout)

    def queue_leader(self, queue: str, vhost: str = "/") -> ClusterNode:
        """The node that leads a quorum queue now, as a running node reports it."""
        for row in self.list_queues(vhost, "name", "type", "leader", "members"):
            if row.get("name") != queue:
                continue
            if row.get("type") != "quorum":
                raise HarnessError(
                    f"queue {queue!r} is {row.get('type')}, not quorum; only quorum "
                    "queues have a leader"
                )
            return self.node(str(row.get("leader")))
        raise HarnessError(
            f"no queue {queue!r} in vhost {vhost!r}; declare the topology first"
        )

    def wait_for_leader(
        self,
        queue: str,
        vhost: str = "/",
        *,
        not_on: ClusterNode | None = None,
        within: float = 30.0,
    ) -> ClusterNode:
        """Wait until a running node other than not_on leads the queue."""
        deadline = time.monotonic() + within
        last: str = "no answer"
        while time.monotonic() < deadline:
            try:
                leader = self.queue_leader(queue, vhost)
            except HarnessError as exc:
                last = str(exc)
            else:
                if leader is not not_on and leader.is_running:
                    return leader
                last = f"still led by {leader.nodename}"
            time.sleep(0.5)
        raise HarnessError(f"queue {queue!r} got no new leader in {within:g}s: {last}")

    def list_queues(self, vhost: str, *columns: str) -> list[dict[str, Any]]:
        """`rabbitmqctl list_queues` as rows, asked of a running node."""
        output = self.ctl(
            self._any_running(),
            "list_queues",
            "--vhost",
            vhost,
            "--formatter",
            "json",
            *columns,
        )
        rows: list[dict[str, Any]] = json.loads(output or "[]")
        return rows

    def connections(self) -> dict[str, int]:
        """Each client connection's name and the AMQP port (node) it is open on."""
        output = self.ctl(
            self._any_running(),
            "list_connections",
            "--formatter",
            "json",
            "port",
            "client_properties",
        )
        found: dict[str, int] = {}
        for row in json.loads(output or "[]"):
            name = _connection_name(row.get("client_properties"))
            if name:
                found[name] = int(row["port"])
        return found

    def node_of_connection(self, prefix: str) -> ClusterNode | None:
        """The node holding the client connection whose name starts with prefix."""
        for name, port in self.connections().items():
            if name.startswith(prefix):
                return next(n for n in self.nodes if n.amqp_port == port)
        return None

    def add_vhost(self, name: str) -> None:
        """A vhost that guest may use fully, created through a running node."""
        node = self._any_running()
        self.ctl(node, "add_vhost", name)
        self.ctl(node, "set_permissions", "--vhost", name, "guest", ".*", ".*", ".*")

    def environment(self, node: ClusterNode) -> dict[str, str]:
        """What a node and the CLI tools aimed at it must see, and nothing more."""
        inherited = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        return {
            **inherited,
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ERL_EPMD_ADDRESS": HOST,
            "RABBITMQ_NODENAME": node.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_PID_FILE": str(node.base / "rabbitmq.pid"),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(node.base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.base / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_DIST,
            "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_DIST,
        }

    def _write_cookie(self) -> None:
        cookie = self.root / ".erlang.cookie"
        with contextlib.suppress(FileNotFoundError):
            cookie.chmod(0o600)
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)

    def _write_node_files(self, node: ClusterNode) -> None:
        # Files of the node's own, so that nothing comes from /etc/rabbitmq,
        # whose listener is the machine's broker on 5672.
        for folder in ("mnesia", "log"):
            (node.base / folder).mkdir(parents=True, exist_ok=True)
        (node.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = {HOST}:{node.amqp_port}\n"
            "loopback_users.guest = true\n"
        )
        (node.base / "rabbitmq-env.conf").write_text("")
        (node.base / "enabled_plugins").write_text("[].\n")

    def _launch(self, node: ClusterNode) -> None:
        node.starts += 1
        with node.log_path.open("ab") as console:
            console.write(f"=== start {node.starts}\n".encode())
            console.flush()
            node.process = subprocess.Popen(
                [str(self._scripts / "rabbitmq-server")],
                env=self.environment(node),
                cwd=node.base,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_booted(self, node: ClusterNode) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not node.accepts():
            if not node.is_running:
                raise HarnessError(
                    f"RabbitMQ node {node.nodename} exited while booting; its "
                    f"console ({node.log_path}):\n{node.console_tail()}"
                )
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"RabbitMQ node {node.nodename} did not listen on port "
                    f"{node.amqp_port} within {BOOT_TIMEOUT:g}s; its console:\n"
                    f"{node.console_tail()}"
                )
            time.sleep(0.2)
        try:
            self.ctl(node, "await_startup", "--timeout", str(int(BOOT_TIMEOUT)))
        except HarnessError as exc:
            raise HarnessError(
                f"RabbitMQ node {node.nodename} did not finish booting ({exc}); "
                f"its console ({node.log_path}):\n{node.console_tail()}"
            ) from None

    def _join(self, node: ClusterNode) -> None:
        self.ctl(node, "stop_app")
        self.ctl(node, "reset")
        self.ctl(node, "join_cluster", self.first.nodename)
        self.ctl(node, "start_app")
        self.ctl(node, "await_startup", "--timeout", str(int(BOOT_TIMEOUT)))

    def _check_membership(self) -> None:
        output = self.ctl(self.first, "cluster_status", "--formatter", "json")
        running = set(json.loads(output).get("running_nodes", []))
        wanted = {node.nodename for node in self.nodes}
        if running != wanted:
            raise HarnessError(
                f"the cluster formed with {sorted(running)}, not {sorted(wanted)}; "
                f"see the consoles under {self.root}"
            )

    def _any_running(self) -> ClusterNode:
        for node in self.nodes:
            if node.is_running and not node.frozen and node.accepts():
                return node
        raise HarnessError("no node of the cluster is running; start one first")

    def _reap(self, node: ClusterNode, timeout: float) -> None:
        """Wait up to timeout for the node's process to end, then SIGKILL it."""
        process = node.process
        if process is None:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        node.process = None

    def _run_tool(
        self, tool: str, node: ClusterNode, args: tuple[str, ...], timeout: float
    ) -> str:
        command = [str(self._scripts / tool), "-n", node.nodename, "-q", *args]
        shown = " ".join([tool, "-n", node.nodename, *args])
        try:
            result = subprocess.run(
                command,
                env=self.environment(node),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"`{shown}` did not finish within {timeout:g}s; the node's console "
                f"is {node.log_path}"
            ) from None
        if result.returncode != 0:
            said = (result.stderr.strip() or result.stdout.strip())[-800:]
            raise HarnessError(
                f"`{shown}` failed with exit {result.returncode}: {said}"
            )
        return result.stdout


def _script_dir() -> Path:
    for folder in SCRIPT_DIRS:
        if (folder / "rabbitmq-server").exists():
            return folder
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise HarnessError(
            "rabbitmq-server is not installed; install it (apt-get install "
            "rabbitmq-server) to run the cluster tests"
        )
    return Path(found).resolve().parent


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, none in the CLI tools' own range."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(probe)
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
            if port not in CLI_DIST_PORTS:
                ports.append(port)
    finally:
        for probe in sockets:
            probe.close()
    return ports


def _connection_name(properties: Any) -> str | None:
    # The JSON formatter renders an AMQP table as a list of [key, type, value].
    if isinstance(properties, dict):
        value = properties.get("connection_name")
        return str(value) if value is not None else None
    if isinstance(properties, list):
        for entry in properties:
            if isinstance(entry, list) and entry and entry[0] == "connection_name":
                return str(entry[-1])
    return None


def _close_all() -> None:
    for cluster in list(_live):
        cluster.close()


atexit.register(_close_all)
