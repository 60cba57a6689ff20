"""Tests of ``hpo submit``, ``status``, ``logs``, ``stop`` and ``jobs`` against a real Ray cluster.

The cluster tests share one Ray head per module (``tests/cluster_fixtures.py``), started
with token authentication on free ports. The end-to-end test joins a second node and
runs a tiny study through the whole service, with an MLflow server on PostgreSQL. The
stop test stops a study in the middle of tuning and checks what it leaves behind.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import pytest
import requests
import yaml

from orchestrator import submit
from orchestrator.cli import main
from orchestrator.errors import ClusterError, SpecError
from orchestrator.spec import load_study
from tests.cluster_fixtures import LocalRayCluster, free_ports, ray_head, ray_two_nodes  # noqa: F401
from tests.postgres import postgres_database

REPOSITORY = Path(__file__).resolve().parents[2]

T = TypeVar("T")

# A tiny study: 1 cell, 4 trials of at most 3 epochs, 2 noise levels x 2 seeds.
SMALL_STUDY = {
    "datasets": ["fashion_mnist"],
    "models": ["mlp"],
    "losses": ["ce"],
    "model_options": {"mlp": {"depth": 2, "width": 32}},
    "data": {"subset": 1500},
    "training": {"epochs": 3, "batch_size": 128},
    "tuning": {"search": "bohb", "num_samples": 4, "max_epochs": 3, "reduction_factor": 3},
    "retrain": {"noise_levels": [0.0, 0.2], "seeds": [0, 1]},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
}


# Helpers -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No address or token leaks in from the machine; ~ is an empty directory."""
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def write_study(directory: Path, name: str, tracking_uri: str | None = None, **sections) -> Path:
    study = yaml.safe_load(yaml.safe_dump(SMALL_STUDY))
    study["name"] = name
    study["directory"] = str(directory / "study")
    study["data"]["root"] = str(directory / "data")
    if tracking_uri is not None:
        study["tracking"] = {"uri": tracking_uri}
    for section, values in sections.items():
        # Mapping sections are merged key by key, and lists such as datasets are replaced.
        if isinstance(values, dict):
            study.setdefault(section, {}).update(values)
        else:
            study[section] = values
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def unused_url() -> str:
    return f"http://127.0.0.1:{free_ports(1)[0]}"


def run_hpo(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_token(directory: Path, token: str) -> Path:
    path = directory / "token"
    path.write_text(token + "\n")
    return path


def cluster_jobs(cluster: LocalRayCluster) -> list[dict]:
    response = requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=cluster.headers, timeout=10)
    response.raise_for_status()
    return response.json()


def jobs_of_study(cluster: LocalRayCluster, study: str) -> list[dict]:
    return [job for job in cluster_jobs(cluster) if (job.get("metadata") or {}).get("hpo.study") == study]


def wait_for_log(connection: submit.ClusterConnection, job_id: str, text: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    logs = ""
    while time.monotonic() < deadline:
        logs = connection.client.get_job_logs(job_id)
        if text in logs:
            return logs
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in the log of {job_id} after {timeout_s} s: {logs!r}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# Address and token -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://head:8265", "http://head:8265"),
        ("http://head:8265/", "http://head:8265"),
        ("head:8265", "http://head:8265"),
        ("https://ray.example.org", "https://ray.example.org"),
    ],
)
def test_resolve_address_forms(given, expected):
    assert submit.resolve_address(given, environ={}) == expected


def test_resolve_address_from_environment():
    assert submit.resolve_address(None, environ={"RAY_ADDRESS": "http://env:8265"}) == "http://env:8265"
    assert submit.resolve_address("http://option:1", environ={"RAY_ADDRESS": "http://env:8265"}) == "http://option:1"


def test_resolve_address_missing():
    with pytest.raises(ClusterError) as caught:
        submit.resolve_address(None, environ={})
    assert "--address" in str(caught.value)
    assert "RAY_ADDRESS" in str(caught.value)


@pytest.mark.parametrize("address", ["ray://head:10001", "grpc://head:1"])
def test_resolve_address_rejects_scheme(address):
    with pytest.raises(ClusterError, match="http://HEAD:8265"):
        submit.resolve_address(address, environ={})


def test_resolve_token_order(tmp_path, clean_environment):
    option_file = write_token(tmp_path, "from-option")
    path_file = tmp_path / "path-token"
    path_file.write_text("from-path")
    default_file = clean_environment / ".ray" / "auth_token"
    default_file.parent.mkdir()
    default_file.write_text("from-default\n")
    environ = {"RAY_AUTH_TOKEN": "from-variable", "RAY_AUTH_TOKEN_PATH": str(path_file)}

    assert submit.resolve_token(str(option_file), environ).value == "from-option"
    assert submit.resolve_token(None, environ).value == "from-variable"
    assert submit.resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(path_file)}).value == "from-path"
    token = submit.resolve_token(None, {})
    assert token.value == "from-default"
    assert token.source == "~/.ray/auth_token"


def test_resolve_token_none_found():
    assert submit.resolve_token(None, {}) is None


def test_resolve_token_missing_file(tmp_path):
    with pytest.raises(ClusterError) as caught:
        submit.resolve_token(str(tmp_path / "absent"), {})
    message = str(caught.value)
    assert "not found" in message
    assert "--token-file" in message


def test_resolve_token_empty_file(tmp_path):
    with pytest.raises(ClusterError, match="is empty"):
        submit.resolve_token(str(write_token(tmp_path, "  ")), {})


def test_token_value_not_in_repr(tmp_path):
    token = submit.resolve_token(str(write_token(tmp_path, "secret-value")), {})
    assert "secret-value" not in repr(token)


def test_describe_refused_connection():
    with pytest.raises(requests.ConnectionError) as caught:
        requests.get(unused_url(), timeout=5)
    assert submit.describe_connection_error(caught.value) == "connection refused"


# Resources ---------------------------------------------------------------------------------


def node(cpus: float, gpus: float = 0, is_head: bool = False) -> submit.NodeResources:
    return submit.NodeResources(node_id=uuid.uuid4().hex, node_ip="10.0.0.1", is_head=is_head, cpus=cpus, gpus=gpus)


def test_check_resources_feasible():
    submit.check_resources("s", 1, 0.25, [node(4, is_head=True), node(8, gpus=1)], "http://h:8265")
    submit.check_resources("s", 2, 0, [node(2, is_head=True)], "http://h:8265")


def test_check_resources_no_gpu():
    with pytest.raises(ClusterError) as caught:
        submit.check_resources("x", 1, 0.25, [node(2, is_head=True), node(1)], "http://h:8265")
    assert str(caught.value) == (
        "study 'x' needs 0.25 GPU per trial but the cluster at http://h:8265 has no GPU; "
        "set resources.gpus_per_trial: 0 or add GPU workers"
    )


def test_check_resources_too_few_gpus():
    with pytest.raises(ClusterError, match="at most 1 or add larger GPU workers"):
        submit.check_resources("x", 1, 2, [node(8, gpus=1)], "http://h:8265")


def test_check_resources_too_many_cpus():
    with pytest.raises(ClusterError, match="needs 4 CPUs per trial .* has 2; set resources.cpus_per_trial to at most 2"):
        submit.check_resources("x", 4, 0, [node(2), node(1)], "http://h:8265")


def test_check_resources_cpus_and_gpus_apart():
    # The CPU-rich node has no GPU and the GPU node has too few CPUs.
    with pytest.raises(ClusterError, match="GPU nodes of the cluster at http://h:8265 have at most 2 CPUs"):
        submit.check_resources("x", 4, 1, [node(16), node(2, gpus=1)], "http://h:8265")


def test_check_resources_no_nodes():
    with pytest.raises(ClusterError, match="no alive node"):
        submit.check_resources("x", 1, 0, [], "http://h:8265")


# The study in a job ------------------------------------------------------------------------


def test_study_with_local_store_rejected(tmp_path):
    spec = load_study(write_study(tmp_path, "local-store"))
    with pytest.raises(SpecError) as caught:
        submit.check_study_for_cluster(spec)
    assert "tracking.uri sqlite:///" in str(caught.value)
    assert "http://mlflow:5000" in str(caught.value)


def test_study_with_server_store_accepted(tmp_path):
    spec = load_study(write_study(tmp_path, "server-store", tracking_uri="http://mlflow:5000"))
    submit.check_study_for_cluster(spec)


def test_study_with_local_ray_rejected(tmp_path):
    spec = load_study(write_study(tmp_path, "local-ray", tracking_uri="http://mlflow:5000", cluster={"address": "local"}))
    with pytest.raises(SpecError, match="remove cluster.address"):
        submit.check_study_for_cluster(spec)


def test_submission_id_format():
    moment = datetime(2026, 1, 2, 3, 4, 5)
    assert submit.make_submission_id("fashion-mnist-demo", moment) == "hpo-fashion-mnist-demo-20260102-030405"


def test_runtime_env_ships_packages(tmp_path):
    env = submit.build_runtime_env(tmp_path, "hpo-x-1")
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"]["HPO_RAY_JOB_ID"] == "hpo-x-1"
    assert float(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) < submit.STOP_TIMEOUT_S
    shipped = {Path(directory).name: Path(directory) for directory in env["py_modules"]}
    assert set(shipped) == {"orchestrator", "trainables", "search_spaces"}
    for directory in shipped.values():
        assert (directory / "__init__.py").is_file()
    assert (shipped["orchestrator"] / "cli.py").is_file()


def test_study_entrypoint_quotes_file():
    assert submit.study_entrypoint("my study.yaml") == "python -m orchestrator.cli run 'my study.yaml'"


def test_study_entrypoint_resume():
    assert submit.study_entrypoint("s.yaml", resume=True) == "python -m orchestrator.cli run s.yaml --resume"


def test_staged_study_copies_search_space(tmp_path):
    (tmp_path / "spaces").mkdir()
    shutil.copy(REPOSITORY / "search_spaces" / "table1.yaml", tmp_path / "spaces" / "mine.yaml")
    study_path = write_study(tmp_path, "own-space", tracking_uri="http://m:5000", tuning={"search_space": "spaces/mine.yaml"})
    spec = load_study(study_path)
    with submit.staged_study(study_path, spec, None) as (root, study_file):
        assert study_file == "own-space.yaml"
        assert sorted(path.relative_to(root).as_posix() for path in root.rglob("*.yaml")) == [
            "own-space.yaml", "spaces/mine.yaml",
        ]
        staged_root = root
    assert not staged_root.exists()


def test_staged_study_rejects_outside_file(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(REPOSITORY / "search_spaces" / "table1.yaml", outside / "mine.yaml")
    studies = tmp_path / "studies"
    studies.mkdir()
    study_path = write_study(studies, "far-space", tracking_uri="http://m:5000", tuning={"search_space": "../elsewhere/mine.yaml"})
    spec = load_study(study_path)
    with pytest.raises(SpecError, match="--working-dir"):
        with submit.staged_study(study_path, spec, None):
            pass
    with submit.staged_study(study_path, spec, tmp_path) as (root, study_file):
        assert root == tmp_path.resolve()
        assert study_file == "studies/far-space.yaml"


def test_staged_study_working_dir_must_contain_study(tmp_path):
    study_path = write_study(tmp_path, "not-inside", tracking_uri="http://m:5000")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SpecError, match="is outside --working-dir"):
        with submit.staged_study(study_path, load_study(study_path), other):
            pass


def test_parser_registers_cluster_commands():
    from orchestrator.cli import build_parser

    parser = build_parser()
    cases = {
        "submit": ["submit", "s.yaml", "--address", "http://h:8265", "--token-file", "t", "--wait", "--resume",
                   "--working-dir", "."],
        "status": ["status"],
        "logs": ["logs", "job-1", "--follow"],
        "stop": ["stop", "job-1", "--timeout", "5"],
        "jobs": ["jobs", "--address", "http://h:8265"],
    }
    for name, argv in cases.items():
        args = parser.parse_args(argv)
        assert args.handler is getattr(submit, f"handle_{name}"), name
    defaults = parser.parse_args(["submit", "s.yaml"])
    assert defaults.wait is False
    assert defaults.resume is False
    assert parser.parse_args(["submit", "s.yaml", "--wait", "--no-wait"]).wait is False


def test_missing_address_fails_before_cluster(capsys):
    code, out, err = run_hpo(capsys, "jobs")
    assert code == 2
    assert err.strip().splitlines() == [
        "hpo jobs: error: no Ray cluster address given; pass --address http://HEAD:8265 or set RAY_ADDRESS "
        "to the dashboard URL of the head node"
    ]


# Against a real cluster --------------------------------------------------------------------


@pytest.mark.slow
def test_submit_without_token(ray_head, tmp_path, capsys):
    name = unique("no-token")
    study = write_study(tmp_path, name, tracking_uri=unused_url())
    code, out, err = run_hpo(capsys, "submit", str(study), "--address", ray_head.dashboard_url)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("hpo submit: error: the Ray cluster at http://127.0.0.1:")
    assert "requires an authentication token and none was found in --token-file, RAY_AUTH_TOKEN" in lines[0]
    assert "~/.ray/auth_token" in lines[0]
    assert out == ""
    assert jobs_of_study(ray_head, name) == []


@pytest.mark.slow
def test_submit_wrong_token(ray_head, tmp_path, capsys):
    name = unique("wrong-token")
    study = write_study(tmp_path, name, tracking_uri=unused_url())
    token_file = write_token(tmp_path, "0" * 64)
    code, out, err = run_hpo(
        capsys, "submit", str(study), "--address", ray_head.dashboard_url, "--token-file", str(token_file)
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert f"rejected the token from --token-file {token_file} (HTTP 403)" in lines[0]
    assert "0" * 64 not in lines[0]
    assert jobs_of_study(ray_head, name) == []


@pytest.mark.slow
def test_submit_wrong_address(ray_head, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    name = unique("wrong-address")
    study = write_study(tmp_path, name, tracking_uri=unused_url())
    address = unused_url()
    code, out, err = run_hpo(capsys, "submit", str(study), "--address", address)
    assert code == 2
    assert err.strip().splitlines() == [
        f"hpo submit: error: cannot reach the Ray Jobs API at {address}: connection refused; check --address "
        "or RAY_ADDRESS and that the head runs 'ray start --head --dashboard-host 0.0.0.0'"
    ]
    assert jobs_of_study(ray_head, name) == []


@pytest.mark.slow
def test_submit_gpu_study_without_gpus(ray_head, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_head.dashboard_url)
    name = unique("gpu")
    study = write_study(tmp_path, name, tracking_uri=unused_url(), resources={"gpus_per_trial": 0.25})
    token_file = write_token(tmp_path, ray_head.token)
    code, out, err = run_hpo(capsys, "submit", str(study), "--token-file", str(token_file))
    assert code == 2
    assert err.strip().splitlines() == [
        f"hpo submit: error: study '{name}' needs 0.25 GPU per trial but the cluster at {ray_head.dashboard_url} "
        "has no GPU; set resources.gpus_per_trial: 0 or add GPU workers"
    ]
    assert jobs_of_study(ray_head, name) == []


@pytest.mark.slow
def test_submit_too_many_cpus(ray_head, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    name = unique("cpus")
    study = write_study(tmp_path, name, tracking_uri=unused_url(), resources={"cpus_per_trial": 3})
    code, out, err = run_hpo(capsys, "submit", str(study), "--address", ray_head.dashboard_url)
    assert code == 2
    assert "needs 3 CPUs per trial" in err
    assert len(err.strip().splitlines()) == 1
    assert jobs_of_study(ray_head, name) == []


@pytest.mark.slow
def test_submit_local_store_rejected(ray_head, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    name = unique("sqlite")
    study = write_study(tmp_path, name)
    code, out, err = run_hpo(capsys, "submit", str(study), "--address", ray_head.dashboard_url)
    assert code == 2
    assert "set tracking.uri to the MLflow server" in err
    assert jobs_of_study(ray_head, name) == []


@pytest.mark.slow
def test_status_logs_stop_of_a_job(ray_head, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    monkeypatch.setenv("RAY_ADDRESS", ray_head.dashboard_url)
    connection = submit.connect(ray_head.dashboard_url, submit.resolve_token(None))
    job_id = unique("hpo-sleeper")
    submit.submit_entrypoint(
        connection,
        "python -c \"import time; print('hello', flush=True); time.sleep(120)\"",
        submission_id=job_id,
        metadata={"hpo.study": "sleeper"},
    )
    wait_for_log(connection, job_id, "hello")

    code, out, err = run_hpo(capsys, "status", job_id)
    assert code == 0
    assert re.search(rf"^job:\s+{job_id}$", out, re.MULTILINE)
    assert re.search(r"^status:\s+RUNNING$", out, re.MULTILINE)
    assert re.search(r"^study:\s+sleeper$", out, re.MULTILINE)

    code, out, err = run_hpo(capsys, "jobs")
    assert code == 0
    assert re.search(rf"^{job_id}\s+sleeper\s+RUNNING\s", out, re.MULTILINE)

    code, out, err = run_hpo(capsys, "logs", job_id)
    assert code == 0
    assert "hello" in out.splitlines()

    code, out, err = run_hpo(capsys, "stop", job_id)
    assert code == 0
    assert out.strip() == f"job {job_id}: STOPPED"
    assert connection.client.get_job_status(job_id).value == "STOPPED"

    code, out, err = run_hpo(capsys, "status")
    assert code == 0
    block = next(part for part in out.split("\n\n") if job_id in part)
    assert re.search(r"^status:\s+STOPPED$", block, re.MULTILINE)

    # Stopping an ended job reports its status and changes nothing.
    code, out, err = run_hpo(capsys, "stop", job_id)
    assert code == 0
    assert out.strip() == f"job {job_id}: STOPPED"


@pytest.mark.slow
def test_logs_follow_until_job_ends(ray_head, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    connection = submit.connect(ray_head.dashboard_url, submit.resolve_token(None))
    job_id = unique("hpo-short")
    submit.submit_entrypoint(
        connection,
        "python -c \"import time; print('first', flush=True); time.sleep(3); print('second', flush=True)\"",
        submission_id=job_id,
        metadata={"hpo.study": "short"},
    )
    code, out, err = run_hpo(capsys, "logs", job_id, "--follow", "--address", ray_head.dashboard_url)
    assert code == 0
    lines = out.splitlines()
    assert lines.index("first") < lines.index("second")
    assert connection.client.get_job_status(job_id).value == "SUCCEEDED"


@pytest.mark.slow
def test_rejected_runtime_env(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    connection = submit.connect(ray_head.dashboard_url, submit.resolve_token(None))
    job_id = unique("hpo-no-dir")
    with pytest.raises(ClusterError) as caught:
        submit.submit_entrypoint(
            connection, "true", submission_id=job_id, metadata={"hpo.study": "no-dir"},
            runtime_env={"working_dir": str(tmp_path / "missing")},
        )
    message = str(caught.value)
    assert message.startswith(f"submitting job {job_id} failed: Ray rejected the job's runtime environment: ")
    assert str(tmp_path / "missing") in message
    assert "\n" not in message
    assert jobs_of_study(ray_head, "no-dir") == []


@pytest.mark.slow
def test_unknown_job(ray_head, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    for command in ("status", "logs", "stop"):
        code, out, err = run_hpo(capsys, command, "no-such-job", "--address", ray_head.dashboard_url)
        assert code == 2, command
        assert err.strip().splitlines() == [
            f"hpo {command}: error: no job 'no-such-job' on the Ray cluster at {ray_head.dashboard_url}; "
            "list the submitted studies with 'hpo jobs'"
        ]


@pytest.mark.slow
def test_submit_ships_study_and_code(ray_head, tmp_path, capsys, monkeypatch):
    """The job runs 'hpo run' from the shipped code; with no MLflow server there it fails."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    name = unique("shipped")
    tracking_uri = unused_url()
    study = write_study(tmp_path, name, tracking_uri=tracking_uri)

    code, out, err = run_hpo(capsys, "submit", str(study), "--address", ray_head.dashboard_url, "--wait")

    # The submission itself succeeded and printed where to follow the study.
    job_id = re.search(r"^submitted study \S+ as Ray job (\S+)$", out, re.MULTILINE).group(1)
    assert re.fullmatch(rf"hpo-{name}-\d{{8}}-\d{{6}}", job_id)
    assert f"dashboard: {ray_head.dashboard_url}/#/jobs/{job_id}" in out
    assert f"MLflow:    {tracking_uri} (experiment {name})" in out

    # The driver ran 'hpo run' on the cluster, which failed without an MLflow server, so --wait exits 1.
    assert code == 1
    assert f"job {job_id}: FAILED" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"hpo submit: error: job {job_id} of study {name} ended FAILED: ")
    assert lines[0].endswith(f"read its log with 'hpo logs {job_id}'")
    assert "hpo run: error:" in out
    assert "study file not found" not in out

    # The job record carries the study, the study file and the submission id for the driver.
    (job,) = jobs_of_study(ray_head, name)
    assert job["submission_id"] == job_id
    assert job["metadata"]["hpo.study_file"] == f"{name}.yaml"
    assert job["entrypoint"] == f"python -m orchestrator.cli run {name}.yaml"
    assert job["runtime_env"]["env_vars"]["HPO_RAY_JOB_ID"] == job_id
    assert len(job["runtime_env"]["py_modules"]) == 3


@pytest.mark.slow
def test_two_nodes_listed(ray_two_nodes):
    token = submit.AuthToken(ray_two_nodes.token, "test")
    nodes = submit.list_alive_nodes(ray_two_nodes.dashboard_url, token)
    assert sorted((node.is_head, node.cpus, node.gpus) for node in nodes) == [(False, 1.0, 0.0), (True, 2.0, 0.0)]


# End to end --------------------------------------------------------------------------------


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, directory: Path) -> Iterator[str]:
    """Run 'mlflow server' on ``backend_store_uri`` with served artifacts; yield its URL."""
    port = free_ports(1)[0]
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "mlflow-server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--serve-artifacts", "--artifacts-destination", str(directory / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"mlflow server exited: {log_path.read_text()[-2000:]}"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"mlflow server not up after 120 s: {log_path.read_text()[-2000:]}"
            time.sleep(0.5)
        yield url
    finally:
        # The server and its workers form their own process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def actors_of_job(cluster: LocalRayCluster, ray_job_id: str) -> list[dict]:
    """Return the state API's rows (class_name, state, node_id, ...) for the actors of a Ray job."""
    response = requests.get(
        f"{cluster.dashboard_url}/api/v0/actors",
        params={"detail": "1", "limit": "10000", "filter_keys": "job_id",
                "filter_predicates": "=", "filter_values": ray_job_id},
        headers=cluster.headers,
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["data"]["result"]["result"]


def nodes_of_job_actors(cluster: LocalRayCluster, ray_job_id: str) -> set[str]:
    """Return the ids of the nodes that ran actors of a Ray job, read from the state API."""
    return {row["node_id"] for row in actors_of_job(cluster, ray_job_id) if row.get("node_id")}


@pytest.mark.slow
def test_submit_study_end_to_end(ray_two_nodes, tmp_path, capsys, monkeypatch):
    """A tiny study submitted to a two-node cluster ends SUCCEEDED with its whole record in
    MLflow on PostgreSQL, and 'hpo export' turns that record into Table 2."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_two_nodes.token)
    monkeypatch.setenv("RAY_ADDRESS", ray_two_nodes.dashboard_url)
    name = unique("e2e")
    cells, noise_levels, seeds, samples = 1, 2, 2, 4

    with postgres_database("hpo_submit") as database, mlflow_server(database, tmp_path / "mlflow") as tracking_uri:
        study = write_study(tmp_path, name, tracking_uri=tracking_uri, storage={"path": str(tmp_path / "ray_results")})

        # Submit and follow the job to its end.
        code, out, err = run_hpo(capsys, "submit", str(study), "--wait")
        assert code == 0, f"{err}\n{out[-4000:]}"
        job_id = re.search(r"^submitted study \S+ as Ray job (\S+)$", out, re.MULTILINE).group(1)
        assert f"job {job_id}: SUCCEEDED" in out
        code, status_out, _ = run_hpo(capsys, "status", job_id)
        assert re.search(r"^status:\s+SUCCEEDED$", status_out, re.MULTILINE)

        # The driver's actors are its Ray Tune trials; 3 CPUs on 2 nodes run them side by side.
        (job,) = jobs_of_study(ray_two_nodes, name)
        assert len(nodes_of_job_actors(ray_two_nodes, job["job_id"])) == 2

        # The whole record is in MLflow, and the study run names the job.
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        phases: dict[str, list] = {}
        for run in runs:
            phases.setdefault(run.data.tags.get("phase"), []).append(run)
        (study_run,) = phases["study"]
        assert study_run.data.tags["ray_job_id"] == job_id
        assert len(phases["cell"]) == cells
        assert len(phases["tune"]) == cells * samples
        assert len(phases["retrain"]) == cells * noise_levels * seeds
        for run in runs:
            assert run.info.status == "FINISHED", run.data.tags
        for run in phases["retrain"]:
            assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0

        # Export Table 2 from the server.
        export_dir = tmp_path / "export"
        code, out, err = run_hpo(capsys, "export", str(study), "--out", str(export_dir))
        assert code == 0, err
        with open(export_dir / "table2.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == cells * noise_levels


# Stopping a study --------------------------------------------------------------------------

# Trials that last long enough for a stop to land in the middle of tuning. An epoch of 2,400
# synthetic training images through a 6 x 1024 MLP took about 1.1 s on one core of the
# two-core test machine (PyTorch 2.14 on CPU), so a trial of 30 epochs takes over 30 s.
LONG_TRIALS = {
    "datasets": ["synthetic"],
    "model_options": {"mlp": {"depth": 6, "width": 1024}},
    "data": {"subset": None},
    "training": {"epochs": 30},
    "tuning": {"num_samples": 4, "max_epochs": 30},
}
# MLflow statuses of a run that a stop ended.
STOPPED_RUN_STATUSES = {"KILLED", "FAILED"}


def poll(probe: Callable[[], T], done: Callable[[T], bool], timeout_s: float, interval_s: float = 1.0) -> T:
    """Call ``probe`` every ``interval_s`` seconds until ``done`` accepts its value or ``timeout_s``
    seconds have passed; return the last value either way."""
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = probe()
    return value


def runs_of_study(client, study: str) -> list:
    """Return every run of the study's experiment (none while the driver has not created it)."""
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], max_results=1000)


def supervisor_log(cluster: LocalRayCluster, job_id: str) -> str:
    """Return Ray's supervisor log of a job. It records whether the driver exited on the stop
    signal or was killed with SIGKILL."""
    paths = sorted(cluster.root.glob(f"*/session_latest/logs/jobs/supervisor-{job_id}.log"))
    return "\n".join(path.read_text(errors="replace") for path in paths)


def job_diagnostics(connection: submit.ClusterConnection, cluster: LocalRayCluster, job_id: str) -> str:
    """Return the tails of a job's driver log and supervisor log, for assertion messages."""
    driver_log = connection.client.get_job_logs(job_id)
    return f"driver log:\n{driver_log[-4000:]}\nsupervisor log:\n{supervisor_log(cluster, job_id)[-2000:]}"


@pytest.mark.slow
def test_stop_study_mid_tuning(ray_head, tmp_path, capsys, monkeypatch):
    """'hpo stop' on a study in the middle of tuning leaves no MLflow run RUNNING and no actor alive.

    Ray 2.60 stops a job in ``JobSupervisor.run`` (ray/dashboard/modules/job/job_supervisor.py).
    It sends SIGTERM (or the signal named by ``RAY_JOB_STOP_SIGNAL``) to the driver and to every
    child process of the driver. It then waits ``RAY_JOB_STOP_WAIT_TIME_S`` seconds, 3 by
    default, sends SIGKILL to the processes still alive and marks the job STOPPED. The
    supervisor reads that variable from its own environment, which includes the env_vars of
    the job's runtime_env. Without it the driver has 3 s to end its runs KILLED, and 'hpo stop'
    returns only after the job is STOPPED. The supervisor sends no signal to the trial actors,
    because Ray ends them when their job's driver exits.
    """
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    monkeypatch.setenv("RAY_ADDRESS", ray_head.dashboard_url)
    name = unique("stop")

    with postgres_database("hpo_stop") as database, mlflow_server(database, tmp_path / "mlflow") as tracking_uri:
        study = write_study(
            tmp_path, name, tracking_uri=tracking_uri, storage={"path": str(tmp_path / "ray_results")}, **LONG_TRIALS
        )
        connection = submit.connect(ray_head.dashboard_url, submit.resolve_token(None))
        client = MlflowClient(tracking_uri)

        # Submit without waiting.
        code, out, err = run_hpo(capsys, "submit", str(study))
        assert code == 0, err
        job_id = re.search(r"^submitted study \S+ as Ray job (\S+)$", out, re.MULTILINE).group(1)

        # Wait until a trial is training. The first trial run appeared 20 to 30 s after the
        # submission on the two-core test machine, and 180 s leave room for a busier one.
        def running_trials() -> list:
            return [
                run for run in runs_of_study(client, name)
                if run.data.tags.get("phase") == "tune" and run.info.status == "RUNNING"
            ]

        trials_before_stop = poll(running_trials, bool, timeout_s=180)
        assert trials_before_stop, f"no trial run RUNNING after 180 s\n{job_diagnostics(connection, ray_head, job_id)}"
        (job,) = jobs_of_study(ray_head, name)
        assert job["status"] == "RUNNING"
        ray_job_id = job["job_id"]
        assert actors_of_job(ray_head, ray_job_id), "the job has no actor although a trial is running"

        # Stop the job. 'hpo stop' returns once Ray reports that it ended.
        code, out, err = run_hpo(capsys, "stop", job_id)
        assert code == 0, err
        assert out.strip() == f"job {job_id}: STOPPED"
        code, status_out, _ = run_hpo(capsys, "status", job_id)
        assert code == 0
        assert re.search(r"^status:\s+STOPPED$", status_out, re.MULTILINE)
        diagnostics = job_diagnostics(connection, ray_head, job_id)

        # No run of the study is left RUNNING. The study, its cell and the trials that were
        # running ended KILLED or FAILED.
        runs = poll(
            lambda: runs_of_study(client, name),
            lambda found: not any(run.info.status == "RUNNING" for run in found),
            timeout_s=60,
        )
        still_running = [(run.data.tags.get("phase"), run.info.run_name) for run in runs if run.info.status == "RUNNING"]
        assert still_running == [], f"runs still RUNNING 60 s after the stop\n{diagnostics}"
        phases: dict[str, list] = {}
        for run in runs:
            phases.setdefault(run.data.tags.get("phase"), []).append(run)
        (study_run,) = phases["study"]
        assert study_run.data.tags["ray_job_id"] == job_id
        assert study_run.info.status in STOPPED_RUN_STATUSES, diagnostics
        (cell_run,) = phases["cell"]
        assert cell_run.info.status in STOPPED_RUN_STATUSES, diagnostics
        status_by_run = {run.info.run_id: run.info.status for run in runs}
        for trial in trials_before_stop:
            assert status_by_run[trial.info.run_id] in STOPPED_RUN_STATUSES, (trial.info.run_name, diagnostics)

        # Every actor of the job, the trials included, is dead.
        actors = poll(
            lambda: actors_of_job(ray_head, ray_job_id),
            lambda rows: all(row["state"] == "DEAD" for row in rows),
            timeout_s=60,
        )
        alive = [(row["class_name"], row["state"]) for row in actors if row["state"] != "DEAD"]
        assert alive == [], f"actors of job {job_id} not DEAD 60 s after the stop\n{diagnostics}"
