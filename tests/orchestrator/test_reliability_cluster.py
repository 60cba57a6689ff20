"""A worker node of a two-node Ray cluster dies during tuning; the study still completes.

The cluster is real (``ray start`` processes with token authentication, see
``tests.cluster_fixtures``); the study runs as an ``hpo run`` subprocess connected to it.
Each node has one CPU, so two trials run at once, one on each node. Once a trial runs on
the second node, every process of that node is killed with SIGKILL. Ray Tune restarts the
trial from its last checkpoint on the head node.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from tests.cluster_fixtures import LocalRayCluster, RayNode, process_snapshot
from tests.reliability_helpers import (
    StudyProcess,
    ended_trials,
    marked_session,
    runs_by_phase,
    sqlite_uri,
    write_study,
)

# Title of a worker process that hosts a trial (".train" is appended while it trains).
TRIAL_PROCESS_TITLE = "ray::ImplicitFunc"


@pytest.fixture
def two_nodes():
    # One CPU per node: as soon as two trials run, one of them runs on the second node.
    cluster = LocalRayCluster.start_head(num_cpus=1)
    try:
        cluster.add_node(num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


def node_processes(node: RayNode) -> dict[int, int]:
    """Return {pid: start time} of the processes of one node: its ray start tree and its directory."""
    return process_snapshot([node.process.pid], str(node.temp_dir))


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for_trial_on(node: RayNode, study: StudyProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(command_line(pid).startswith(TRIAL_PROCESS_TITLE) for pid in node_processes(node)):
            return
        assert study.process.poll() is None, study.tail()
        time.sleep(0.2)
    raise AssertionError(f"no trial started on node {node.name} within {timeout_s:.0f} s:\n{study.tail()}")


def test_lost_worker_node_during_tuning(two_nodes, tmp_path):
    name = f"lost-node-{uuid.uuid4().hex[:6]}"
    # Epochs of a few seconds each, so that the node dies while a trial trains there and
    # not after the scheduler stopped it. A width of 1024 gave trials of about 1 s, which
    # sometimes ended before the node was killed.
    study_path = write_study(tmp_path, name, cluster={"address": two_nodes.gcs_address},
                             model_options={"mlp": {"depth": 3, "width": 3072}}, data={"subset": None},
                             tuning={"num_samples": 4, "search": "random"})
    study_dir = tmp_path / name
    worker = two_nodes.nodes[1]
    with marked_session() as (marker, environment):
        environment.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=two_nodes.token)
        study = StudyProcess(["run", str(study_path)], tmp_path / "run.log", environment)
        wait_for_trial_on(worker, study, timeout_s=180)

        # Kill the whole worker node: its ray start process, raylet and workers.
        for pid in node_processes(worker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert study.wait(300) == 0, study.tail()

    runs = runs_by_phase(sqlite_uri(study_dir), name)
    ended = ended_trials(runs)
    assert len(ended) == 4
    assert all(run.data.tags["trial_status"] in ("finished", "stopped") for run in ended)
    retried = [run for run in ended if int(run.data.tags.get("retries", "0")) >= 1]
    assert retried, [run.data.tags for run in ended]
    assert all(run.data.tags["last_error"] for run in retried)
    assert all(run.info.status == "FINISHED" for run in ended)
    assert runs["cell"][0].info.status == "FINISHED"
    assert runs["study"][0].info.status == "FINISHED"
    assert [run.info.status for run in runs["retrain"]] == ["FINISHED"]
    print(f"lost node: {len(retried)} trials retried on the head: "
          f"{[run.data.tags.get('last_error', '')[:80] for run in retried]}")
