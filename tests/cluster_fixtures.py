"""A real multi-node Ray cluster on this machine, with token authentication, for tests.

``LocalRayCluster`` starts a head with ``ray start --head --block`` and joins worker nodes
with ``ray start --address ... --block``. Every node gets its own ports and its own
temporary directory, and the cluster gets a fresh authentication token, so tests can
run beside other Ray instances on the same machine.

Stopping never calls ``ray stop``, because ``ray stop`` kills every Ray process of the
machine, including other users' clusters. ``stop`` takes a snapshot of the process trees
under this cluster's ``ray start`` processes, together with every process whose command
line names the cluster's temporary directory. It sends SIGTERM to the ``ray start``
processes, which shut down their own nodes, and then SIGKILLs whatever is left of the
snapshot. The snapshot includes job drivers, which Ray starts in sessions of their own.
Processes are read from ``/proc``, so this module works on Linux only.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

logger = logging.getLogger(__name__)

# Ray's default GCS port; the machine's Redis server listens there.
FORBIDDEN_PORTS = frozenset({6379})
# Workers of one node take ports from a contiguous range of this size.
WORKER_PORT_COUNT = 40
# Object store per node in bytes; the tests put only small objects.
OBJECT_STORE_BYTES = 300 * 1024 * 1024
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


# Ports -----------------------------------------------------------------------------------


def _port_is_free(port: int) -> bool:
    # Ray binds some servers to every interface, so check the wildcard address.
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports that nothing listens on now, chosen by the kernel."""
    ports: list[int] = []
    with ExitStack() as stack:
        while len(ports) < count:
            sock = stack.enter_context(closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)))
            sock.bind(("0.0.0.0", 0))
            port = sock.getsockname()[1]
            if port not in FORBIDDEN_PORTS:
                ports.append(port)
    return ports


def free_port_range(size: int, low: int = 20000, high: int = 30000) -> tuple[int, int]:
    """Return the first and last port of ``size`` contiguous free ports in [low, high)."""
    for _ in range(200):
        first = random.randrange(low, high - size)
        candidates = range(first, first + size)
        if not FORBIDDEN_PORTS.intersection(candidates) and all(_port_is_free(port) for port in candidates):
            return first, first + size - 1
    raise RuntimeError(f"no {size} contiguous free ports found in [{low}, {high})")


# Processes -------------------------------------------------------------------------------


def _read_stat(pid: int) -> tuple[int, str, int] | None:
    """Return (parent pid, state, start time in clock ticks) of a process, or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in brackets may contain spaces, so split after its closing bracket.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_snapshot(roots: list[int], marker: str) -> dict[int, int]:
    """Return {pid: start time} of the trees under ``roots`` and of processes naming ``marker``."""
    stats = {pid: stat for pid in _all_pids() if (stat := _read_stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in stats.items():
        children.setdefault(parent, []).append(pid)

    # Descendants of the ray start processes.
    selected: set[int] = set()
    pending = [pid for pid in roots if pid in stats]
    while pending:
        pid = pending.pop()
        if pid not in selected:
            selected.add(pid)
            pending.extend(children.get(pid, []))

    # Processes reparented to init but still naming this cluster's directory.
    selected.update(pid for pid in stats if pid != os.getpid() and marker in _command_line(pid))
    return {pid: stats[pid][2] for pid in selected}


def _is_running(pid: int, start_time: int) -> bool:
    stat = _read_stat(pid)
    # A different start time means the pid was reused by an unrelated process.
    return stat is not None and stat[2] == start_time and stat[1] != "Z"


def _signal_if_running(pid: int, start_time: int, signum: int) -> None:
    if _is_running(pid, start_time):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


# The cluster -----------------------------------------------------------------------------


@dataclass
class RayNode:
    """One ``ray start --block`` process and the files it writes."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log_path: Path


@dataclass
class LocalRayCluster:
    """A Ray cluster of ``ray start`` processes on this machine, with token authentication.

    Build it with ``start_head``; ``add_node`` joins more nodes; ``stop`` ends only this
    cluster's processes and deletes its directory.
    """

    root: Path
    token: str
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def dashboard_url(self) -> str:
        """Address of the dashboard and of the Ray Jobs API."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """Address that ``ray start --address`` and ``ray.init`` join."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that authenticate a request to the dashboard."""
        return {"Authorization": f"Bearer {self.token}"}

    @classmethod
    def start_head(cls, num_cpus: int = 2) -> LocalRayCluster:
        """Start a head node and wait until its Ray Jobs API responds."""
        root = Path(tempfile.mkdtemp(prefix="hpo-ray-", dir="/tmp"))
        cluster = cls(root=root, token=secrets.token_hex(32))
        cluster.gcs_port, cluster.dashboard_port, client_port = free_ports(3)
        try:
            cluster._start_node(
                "head",
                [
                    "--head",
                    "--port", str(cluster.gcs_port),
                    "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(cluster.dashboard_port),
                    "--ray-client-server-port", str(client_port),
                    "--num-cpus", str(num_cpus),
                ],
            )
            cluster.wait_until_ready(expected_nodes=1)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def add_node(self, num_cpus: int = 1) -> None:
        """Join one more node to the cluster and wait until the head lists it as alive."""
        expected = len(self.nodes) + 1
        self._start_node(
            f"node{len(self.nodes)}",
            ["--address", self.gcs_address, "--num-cpus", str(num_cpus)],
        )
        self.wait_until_ready(expected_nodes=expected)

    def _start_node(self, name: str, role_arguments: list[str]) -> None:
        node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics = free_ports(6)
        first_worker_port, last_worker_port = free_port_range(WORKER_PORT_COUNT)
        temp_dir = self.root / name
        temp_dir.mkdir()
        log_path = self.root / f"{name}.log"
        command = [
            _ray_executable(), "start", "--block",
            *role_arguments,
            "--node-ip-address", "127.0.0.1",
            "--node-manager-port", str(node_manager),
            "--object-manager-port", str(object_manager),
            "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env),
            "--metrics-export-port", str(metrics),
            "--min-worker-port", str(first_worker_port),
            "--max-worker-port", str(last_worker_port),
            "--num-gpus", "0",
            "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--temp-dir", str(temp_dir),
            "--disable-usage-stats",
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._node_environment(),
                start_new_session=True,
            )
        self.nodes.append(RayNode(name, process, temp_dir, log_path))
        logger.info("started Ray node %s (pid %s) under %s", name, process.pid, temp_dir)

    def _node_environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            # A node drains for 30 s on SIGTERM by default; tests want it gone at once.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # Job entrypoints such as 'python -m ...' must find this interpreter first.
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        return env

    def wait_until_ready(self, expected_nodes: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until the Jobs API responds and ``expected_nodes`` nodes are alive."""
        deadline = time.monotonic() + timeout_s
        last_problem = "no answer yet"
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(
                        f"ray start for {node.name} exited with {node.process.returncode}: "
                        f"{_tail(node.log_path)}"
                    )
            try:
                jobs = requests.get(f"{self.dashboard_url}/api/jobs/", headers=self.headers, timeout=5)
                nodes = requests.get(
                    f"{self.dashboard_url}/api/v0/nodes", params={"detail": "1"}, headers=self.headers, timeout=5
                )
                if jobs.status_code == 200 and nodes.status_code == 200:
                    rows = nodes.json()["data"]["result"]["result"]
                    alive = sum(1 for row in rows if row["state"] == "ALIVE")
                    if alive >= expected_nodes:
                        return
                    last_problem = f"{alive} of {expected_nodes} nodes alive"
                else:
                    last_problem = f"HTTP {jobs.status_code} and {nodes.status_code}"
            except (requests.RequestException, KeyError, ValueError) as err:
                last_problem = str(err)
            time.sleep(0.5)
        raise RuntimeError(f"Ray cluster under {self.root} not ready after {timeout_s:.0f} s: {last_problem}")

    def stop(self) -> None:
        """End every process of this cluster, and only those, then delete its directory."""
        roots = [node.process.pid for node in self.nodes]
        snapshot = process_snapshot(roots, str(self.root))

        # Worker nodes first, one at a time: a worker node whose head is already gone
        # waits for the GCS instead of exiting.
        for node in reversed(self.nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
                try:
                    node.process.wait(timeout=STOP_TIMEOUT_S / 2)
                except subprocess.TimeoutExpired:
                    logger.warning("Ray node %s did not exit within %.0f s of SIGTERM", node.name, STOP_TIMEOUT_S / 2)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and any(_is_running(pid, start) for pid, start in snapshot.items()):
            time.sleep(0.2)

        # Whatever ignored SIGTERM.
        leftovers = {pid: start for pid, start in snapshot.items() if _is_running(pid, start)}
        if leftovers:
            logger.warning("killing %d Ray processes that outlived SIGTERM: %s", len(leftovers), sorted(leftovers))
        for pid, start in leftovers.items():
            _signal_if_running(pid, start, signal.SIGKILL)
        for node in self.nodes:
            try:
                node.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("ray start process %s of %s did not exit", node.process.pid, node.name)
        shutil.rmtree(self.root, ignore_errors=True)

    def running_processes(self) -> list[int]:
        """Return the pids of this cluster's processes that are still running."""
        snapshot = process_snapshot([node.process.pid for node in self.nodes], str(self.root))
        return [pid for pid, start in snapshot.items() if _is_running(pid, start)]


def _ray_executable() -> str:
    beside_python = Path(sys.executable).parent / "ray"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("ray")
    if found is None:
        raise RuntimeError("the 'ray' command is not installed; install ray[default]")
    return found


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# Fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRayCluster]:
    """A Ray head with 2 CPUs and token authentication, shared by the tests of a module."""
    cluster = LocalRayCluster.start_head(num_cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def ray_two_nodes(ray_head: LocalRayCluster) -> Iterator[LocalRayCluster]:
    """``ray_head`` with a second node of 1 CPU joined; the node stops with the head."""
    ray_head.add_node(num_cpus=1)
    yield ray_head
