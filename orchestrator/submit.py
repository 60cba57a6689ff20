"""Submit studies to a Ray cluster through the Ray Jobs API, then follow, list and stop them.

``hpo submit STUDY`` validates the study file on this machine, then checks the cluster
before it uploads anything: the Jobs API responds at ``--address``, the cluster accepts the
token, and one node has the CPUs and GPUs that one trial of the study requests. Only then
does it submit the study driver, ``python -m orchestrator.cli run STUDY``, as a Ray job.
The job's runtime environment carries the study file (``working_dir``) and this project's
packages (``py_modules``), so the cluster runs the code that was submitted. The job
metadata key ``hpo.study`` marks the service's jobs for ``hpo jobs`` and ``hpo status``.
The environment variable ``HPO_RAY_JOB_ID`` tells the driver its submission id, which
the driver records on the study's MLflow run as the tag ``ray_job_id``.

In Ray 2.60, ``ray start --head`` enables token authentication whenever a token is
available or ``RAY_AUTH_MODE=token`` is set. The token is read from ``--token-file``, then ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` and ``~/.ray/auth_token``, the places the
``ray`` command reads. Every request, the log stream included, sends it as
``Authorization: Bearer <token>``. Ray's client (``SubmissionClient`` in Ray 2.60) adds
its own token only when the caller set no Authorization header, so the cluster sees
exactly this token.

Every command talks to the dashboard's HTTP server of the head node (port 8265 by
default), never to the GCS port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from orchestrator.errors import ClusterError, RunFailedError, SpecError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

    from orchestrator.spec import StudySpec

logger = logging.getLogger(__name__)

__all__ = [
    "AuthToken",
    "ClusterConnection",
    "NodeResources",
    "SubmittedStudy",
    "add_parsers",
    "build_runtime_env",
    "check_resources",
    "check_study_for_cluster",
    "connect",
    "find_job",
    "follow_job_logs",
    "list_alive_nodes",
    "make_submission_id",
    "probe_jobs_api",
    "resolve_address",
    "resolve_token",
    "service_jobs",
    "stop_job",
    "submit_entrypoint",
    "submit_study",
    "wait_for_job",
]

# Job metadata and environment shared with the study driver.
STUDY_METADATA_KEY = "hpo.study"
STUDY_FILE_METADATA_KEY = "hpo.study_file"
JOB_ID_VARIABLE = "HPO_RAY_JOB_ID"
# Ray's job supervisor sends SIGTERM on a stop and SIGKILL this many seconds later (3 by
# default in Ray 2.60). Marking runs KILLED and shutting trials down takes longer, so the
# grace period is raised. It must stay below STOP_TIMEOUT_S so that `hpo stop` observes the end.
STOP_GRACE_S = 45

# Sources of the address and the token, in the order they are tried.
ADDRESS_VARIABLE = "RAY_ADDRESS"
TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
TOKEN_SOURCES = f"--token-file, {TOKEN_VARIABLE}, {TOKEN_PATH_VARIABLE} and {DEFAULT_TOKEN_PATH}"
TOKEN_FIX = (
    f"pass --token-file FILE or set {TOKEN_VARIABLE} to the token the cluster was started with "
    "(print it on the head node with 'ray get-auth-token')"
)
ADDRESS_FIX = (
    f"check --address or {ADDRESS_VARIABLE} and that the head runs "
    "'ray start --head --dashboard-host 0.0.0.0'"
)

# Packages that a job uploads, and files that it never uploads (caches, stores, environments).
SHIPPED_PACKAGES = ("orchestrator", "trainables", "search_spaces")
UPLOAD_EXCLUDES = ("__pycache__/", "*.pyc", ".git/", "/.venv/", "/runs/", "mlruns/", "*.egg-info/")

# Seconds.
REQUEST_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 1.0

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Tracking stores that live in files of the machine that runs the driver.
LOCAL_TRACKING_SCHEMES = ("sqlite", "file")
# cluster.address values that make the driver join the cluster it runs on.
JOINING_CLUSTER_ADDRESSES = (None, "auto")


# Address and token -------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthToken:
    """A Ray authentication token, and where it was read from (for messages)."""

    value: str = field(repr=False)
    source: str


def resolve_address(option: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """Return the Jobs API address as ``http(s)://HOST:PORT``, from ``--address`` or RAY_ADDRESS.

    An address without a scheme gets ``http://``.

    Raises:
        ClusterError: neither is set, or the address is a Ray Client (``ray://``) address or
            has another scheme than http and https.
    """
    address = (option or environ.get(ADDRESS_VARIABLE, "")).strip()
    if not address:
        raise ClusterError(
            f"no Ray cluster address given; pass --address http://HEAD:8265 or set {ADDRESS_VARIABLE} "
            "to the dashboard URL of the head node"
        )
    if "://" not in address:
        address = f"http://{address}"
    scheme = address.split("://", 1)[0].lower()
    if scheme == "ray":
        raise ClusterError(
            f"address {address} is a Ray Client address, but hpo uses the Ray Jobs API; "
            "pass the dashboard URL of the head node, e.g. http://HEAD:8265"
        )
    if scheme not in ("http", "https"):
        raise ClusterError(f"address {address} has the unsupported scheme {scheme}; use http://HEAD:8265 or https://")
    return address.rstrip("/")


def resolve_token(token_file: str | None, environ: Mapping[str, str] = os.environ) -> AuthToken | None:
    """Return the token from ``--token-file``, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.

    The first source that is set wins. Returns None when none is set, because a cluster
    started with ``RAY_AUTH_MODE=disabled`` needs no token.

    Raises:
        ClusterError: the chosen token file is missing, unreadable or empty.
    """
    if token_file is not None:
        return AuthToken(_read_token_file(Path(token_file).expanduser(), "--token-file"), f"--token-file {token_file}")
    value = environ.get(TOKEN_VARIABLE, "").strip()
    if value:
        return AuthToken(value, TOKEN_VARIABLE)
    path = environ.get(TOKEN_PATH_VARIABLE, "").strip()
    if path:
        return AuthToken(_read_token_file(Path(path).expanduser(), TOKEN_PATH_VARIABLE), f"{TOKEN_PATH_VARIABLE} {path}")
    default = Path(DEFAULT_TOKEN_PATH).expanduser()
    if default.is_file():
        return AuthToken(_read_token_file(default, DEFAULT_TOKEN_PATH), DEFAULT_TOKEN_PATH)
    return None


def _read_token_file(path: Path, origin: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as err:
        raise ClusterError(f"token file {path} (from {origin}) not found; {TOKEN_FIX}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ClusterError(f"cannot read token file {path} (from {origin}): {err}; {TOKEN_FIX}") from err
    if not value:
        raise ClusterError(f"token file {path} (from {origin}) is empty; {TOKEN_FIX}")
    return value


def auth_headers(token: AuthToken | None) -> dict[str, str]:
    """Return the HTTP headers that authenticate a request with ``token`` (none without one)."""
    if token is None:
        return {}
    return {"Authorization": f"Bearer {token.value}"}


# Checking the cluster ----------------------------------------------------------------------


def describe_connection_error(err: BaseException) -> str:
    """Return a short reason for a failed connection, such as 'connection refused'."""
    seen: set[int] = set()
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, socket.gaierror):
            return "host name not found"
        if isinstance(current, TimeoutError):
            return "connection timed out"
        # requests and urllib3 keep the socket error as an argument, a 'reason' or a cause.
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return _one_line(err)


def _one_line(err: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raise_for_auth(status_code: int, address: str, token: AuthToken | None) -> None:
    """Raise ClusterError for the dashboard's responses to a missing (401) or wrong (403) token."""
    if status_code == 401 and token is None:
        raise ClusterError(
            f"the Ray cluster at {address} requires an authentication token and none was found "
            f"in {TOKEN_SOURCES}; {TOKEN_FIX}"
        )
    if status_code in (401, 403):
        source = token.source if token is not None else "the request"
        raise ClusterError(
            f"the Ray cluster at {address} rejected the token from {source} (HTTP {status_code}); {TOKEN_FIX}"
        )


def _get_json(address: str, path: str, token: AuthToken | None, params: Mapping[str, str] | None = None) -> Any:
    """Send GET ``address + path`` with the token and return the decoded JSON body of a 200 response."""
    import requests

    url = f"{address}{path}"
    try:
        response = requests.get(url, params=params, headers=auth_headers(token), timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout as err:
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {address}: no response within {REQUEST_TIMEOUT_S:g} s; {ADDRESS_FIX}"
        ) from err
    except requests.RequestException as err:
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {address}: {describe_connection_error(err)}; {ADDRESS_FIX}"
        ) from err
    _raise_for_auth(response.status_code, address, token)
    if response.status_code != 200:
        raise ClusterError(
            f"GET {url} returned HTTP {response.status_code}: {_one_line(response.text, 120)}; "
            f"check that {address} is the dashboard of a Ray head node (port 8265 by default)"
        )
    try:
        return response.json()
    except ValueError as err:
        raise ClusterError(
            f"GET {url} returned no JSON; check that {address} is the dashboard of a Ray head node"
        ) from err


def probe_jobs_api(address: str, token: AuthToken | None) -> str:
    """Check that the Ray Jobs API at ``address`` responds and accepts ``token``.

    Returns the cluster's Ray version.

    Raises:
        ClusterError: the address is unreachable or times out after REQUEST_TIMEOUT_S, the
            cluster requires a token and none was found, it rejects the token, or the address
            is not a Ray dashboard.
    """
    body = _get_json(address, "/api/version", token)
    if not isinstance(body, dict) or "ray_version" not in body:
        raise ClusterError(
            f"{address}/api/version returned no Ray version; check that {address} is the dashboard "
            "of a Ray head node (port 8265 by default)"
        )
    return str(body["ray_version"])


@dataclass(frozen=True)
class NodeResources:
    """Total CPUs and GPUs of one alive node of the cluster."""

    node_id: str
    node_ip: str
    is_head: bool
    cpus: float
    gpus: float


def list_alive_nodes(address: str, token: AuthToken | None) -> list[NodeResources]:
    """Return the alive nodes of the cluster, read from the dashboard's state API (/api/v0/nodes).

    Raises:
        ClusterError: the request fails or the response is not in the state API's format.
    """
    body = _get_json(address, "/api/v0/nodes", token, params={"detail": "1", "limit": "10000"})
    try:
        rows = body["data"]["result"]["result"]
        return [
            NodeResources(
                node_id=row["node_id"],
                node_ip=row.get("node_ip", ""),
                is_head=bool(row.get("is_head_node", False)),
                cpus=float(row["resources_total"].get("CPU", 0)),
                gpus=float(row["resources_total"].get("GPU", 0)),
            )
            for row in rows
            if row.get("state") == "ALIVE"
        ]
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ClusterError(
            f"{address}/api/v0/nodes returned an unexpected response ({_one_line(repr(err), 80)}); "
            "check that the cluster runs Ray 2.x with the dashboard enabled"
        ) from err


def check_resources(study: str, cpus: float, gpus: float, nodes: Sequence[NodeResources], address: str) -> None:
    """Raise ClusterError unless one node has ``cpus`` CPUs and ``gpus`` GPUs for one trial.

    Ray keeps a trial that no node can host pending forever, so the study would hang.
    """
    if not nodes:
        raise ClusterError(f"the Ray cluster at {address} has no alive node; start the head node and its workers")
    if any(node.cpus >= cpus and node.gpus >= gpus for node in nodes):
        return
    max_gpus = max(node.gpus for node in nodes)
    max_cpus = max(node.cpus for node in nodes)
    if gpus > 0 and max_gpus == 0:
        raise ClusterError(
            f"study '{study}' needs {gpus:g} GPU per trial but the cluster at {address} has no GPU; "
            "set resources.gpus_per_trial: 0 or add GPU workers"
        )
    if gpus > max_gpus:
        raise ClusterError(
            f"study '{study}' needs {gpus:g} GPUs per trial but the largest node of the cluster at {address} "
            f"has {max_gpus:g}; set resources.gpus_per_trial to at most {max_gpus:g} or add larger GPU workers"
        )
    if gpus == 0 or cpus > max_cpus:
        raise ClusterError(
            f"study '{study}' needs {cpus:g} CPUs per trial but the largest node of the cluster at {address} "
            f"has {max_cpus:g}; set resources.cpus_per_trial to at most {max_cpus:g} or add larger workers"
        )
    gpu_node_cpus = max(node.cpus for node in nodes if node.gpus >= gpus)
    raise ClusterError(
        f"study '{study}' needs {cpus:g} CPUs and {gpus:g} GPUs per trial on one node, but the GPU nodes of "
        f"the cluster at {address} have at most {gpu_node_cpus:g} CPUs; set resources.cpus_per_trial "
        f"to at most {gpu_node_cpus:g} or add GPU workers with more CPUs"
    )


def check_study_for_cluster(spec: StudySpec) -> None:
    """Raise SpecError for study settings that cannot work in a job on a cluster.

    A SQLite or file tracking store would be written inside the job's temporary working
    directory on the head node, out of reach of ``hpo export``. A ``cluster.address``
    other than auto would make the driver start or join another Ray instance.
    """
    uri = spec.resolved_tracking_uri
    if uri.split(":", 1)[0].lower() in LOCAL_TRACKING_SCHEMES:
        raise SpecError(
            f"{spec.source}: tracking.uri {uri} is a file on the machine that runs the study, so on a "
            "cluster the results would stay in the job's temporary directory; set tracking.uri to the "
            "MLflow server, e.g. http://mlflow:5000"
        )
    if spec.cluster.address not in JOINING_CLUSTER_ADDRESSES:
        raise SpecError(
            f"{spec.source}: cluster.address {spec.cluster.address} would connect the submitted driver to "
            "another Ray instance; remove cluster.address so the job runs on the cluster it was submitted to"
        )


# Connecting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterConnection:
    """A checked connection to the Ray Jobs API of one cluster."""

    address: str
    token: AuthToken | None
    ray_version: str
    client: JobSubmissionClient = field(repr=False)


@contextlib.contextmanager
def _jobs_api_errors(address: str, action: str) -> Iterator[None]:
    """Turn the failures of Ray's job client during ``action`` into one-line ClusterErrors."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        raise ClusterError(f"{action} failed: the Ray cluster at {address} rejected the token; {TOKEN_FIX}") from err
    except (requests.RequestException, aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as err:
        raise ClusterError(
            f"{action} failed: cannot reach the Ray Jobs API at {address}: {describe_connection_error(err)}; "
            f"{ADDRESS_FIX}"
        ) from err
    except ValueError as err:
        # Ray's client validates and packages the runtime environment before uploading it.
        raise ClusterError(
            f"{action} failed: Ray rejected the job's runtime environment: {_one_line(err)}; "
            "check --working-dir and the files that the study names"
        ) from err
    except RuntimeError as err:
        raise ClusterError(
            f"{action} failed on the Ray cluster at {address}: {_one_line(err)}; "
            "see the dashboard logs on the head node (/tmp/ray/session_latest/logs/dashboard*.log)"
        ) from err


def connect(address: str, token: AuthToken | None) -> ClusterConnection:
    """Check the Jobs API at ``address`` with ``token`` and return a connection to it.

    Raises:
        ClusterError: see ``probe_jobs_api``.
    """
    import ray
    from ray.job_submission import JobSubmissionClient

    cluster_version = probe_jobs_api(address, token)
    if cluster_version != ray.__version__:
        logger.warning(
            "the Ray cluster at %s runs Ray %s but this machine has Ray %s; jobs run with the cluster's "
            "packages, so install the same versions on both to avoid surprises",
            address, cluster_version, ray.__version__,
        )
    with _jobs_api_errors(address, "connecting to the Ray Jobs API"):
        client = JobSubmissionClient(address, headers=auth_headers(token))
    logger.debug("connected to the Ray Jobs API at %s (Ray %s)", address, cluster_version)
    return ClusterConnection(address, token, cluster_version, client)


# Submitting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmittedStudy:
    """A study submitted as a Ray job, and where to follow it."""

    submission_id: str
    study: str
    tracking_uri: str
    experiment: str
    dashboard_url: str


def make_submission_id(study: str, now: datetime | None = None) -> str:
    """Return the job's submission id, ``hpo-<study>-<YYYYmmdd-HHMMSS>`` in local time."""
    moment = now if now is not None else datetime.now()
    return f"hpo-{study}-{moment:%Y%m%d-%H%M%S}"


def package_directories() -> list[Path]:
    """Return the source directories of the packages that a job ships in ``py_modules``."""
    directories = []
    for name in SHIPPED_PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, f"package {name} is not importable"
        directories.append(Path(next(iter(spec.submodule_search_locations))))
    return directories


def build_runtime_env(working_dir: Path, submission_id: str) -> dict[str, Any]:
    """Return the job's runtime environment: the working directory, the project's packages
    and the variable that passes the submission id to the driver."""
    return {
        "working_dir": str(working_dir),
        "py_modules": [str(directory) for directory in package_directories()],
        "excludes": list(UPLOAD_EXCLUDES),
        "env_vars": {
            JOB_ID_VARIABLE: submission_id,
            "PYTHONUNBUFFERED": "1",
            "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S),
        },
    }


def submitted_job_id() -> str | None:
    """Return the submission id when this process is the driver of a job that ``hpo submit`` started."""
    return os.environ.get(JOB_ID_VARIABLE) or None


def study_entrypoint(study_file: str, resume: bool = False) -> str:
    """Return the job's shell command that runs the study file (relative to the working dir)."""
    command = f"python -m orchestrator.cli run {shlex.quote(study_file)}"
    return f"{command} --resume" if resume else command


def _files_to_upload(study_path: Path, spec: StudySpec) -> list[Path]:
    files = [study_path]
    # A built-in search space is a name; a search space file is an absolute path after parsing.
    if os.path.isabs(spec.tuning.search_space):
        files.append(Path(spec.tuning.search_space).resolve())
    return files


@contextlib.contextmanager
def staged_study(study_path: Path, spec: StudySpec, working_dir: Path | None) -> Iterator[tuple[Path, str]]:
    """Yield the directory to upload as the job's working_dir and the study file's path in it.

    Without ``working_dir`` a temporary directory gets the study file and its search space
    file, at the same relative place. A ``working_dir`` is uploaded as it is.

    Raises:
        SpecError: ``working_dir`` is not a directory, or a file the study needs lies outside
            the uploaded directory.
    """
    study_path = study_path.resolve()
    files = _files_to_upload(study_path, spec)
    if working_dir is not None:
        root = working_dir.expanduser().resolve()
        if not root.is_dir():
            raise SpecError(f"--working-dir {working_dir} is not a directory; pass the directory to upload")
        _check_inside(files, root, "--working-dir " + str(root))
        yield root, study_path.relative_to(root).as_posix()
        return

    _check_inside(files, study_path.parent, "the study file's directory")
    with tempfile.TemporaryDirectory(prefix="hpo-submit-") as temporary:
        root = Path(temporary)
        for path in files:
            target = root / path.relative_to(study_path.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        yield root, study_path.name


def _check_inside(files: Sequence[Path], root: Path, description: str) -> None:
    for path in files:
        if not path.is_relative_to(root):
            raise SpecError(
                f"{path} is outside {description}, so it would not reach the cluster; "
                "pass --working-dir DIR with a directory that contains the study file and the files it names"
            )


def submit_entrypoint(
    connection: ClusterConnection,
    entrypoint: str,
    *,
    submission_id: str,
    metadata: Mapping[str, str],
    runtime_env: Mapping[str, Any] | None = None,
) -> str:
    """Submit the shell command ``entrypoint`` as a Ray job and return its submission id.

    Raises:
        ClusterError: the cluster rejects the job, for example because the id is taken.
    """
    with _jobs_api_errors(connection.address, f"submitting job {submission_id}"):
        return connection.client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            metadata=dict(metadata),
            runtime_env=dict(runtime_env) if runtime_env is not None else None,
        )


def submit_study(
    connection: ClusterConnection,
    study_path: Path,
    spec: StudySpec,
    *,
    working_dir: Path | None = None,
    resume: bool = False,
    now: datetime | None = None,
) -> SubmittedStudy:
    """Submit the driver of a validated study as a Ray job; see the module docstring.

    With ``resume`` the driver continues an interrupted run of the study (``hpo run --resume``).
    """
    submission_id = make_submission_id(spec.name, now)
    with staged_study(study_path, spec, working_dir) as (root, study_file):
        submit_entrypoint(
            connection,
            study_entrypoint(study_file, resume),
            submission_id=submission_id,
            metadata={STUDY_METADATA_KEY: spec.name, STUDY_FILE_METADATA_KEY: study_file},
            runtime_env=build_runtime_env(root, submission_id),
        )
    logger.info("submitted study %s as Ray job %s to %s", spec.name, submission_id, connection.address)
    return SubmittedStudy(
        submission_id=submission_id,
        study=spec.name,
        tracking_uri=spec.resolved_tracking_uri,
        experiment=spec.experiment_name,
        dashboard_url=f"{connection.address}/#/jobs/{submission_id}",
    )


# Following and stopping jobs ---------------------------------------------------------------


def status_name(job: JobDetails) -> str:
    """Return a job's status as a plain string such as 'RUNNING'."""
    return getattr(job.status, "value", str(job.status))


def find_job(connection: ClusterConnection, job_id: str) -> JobDetails:
    """Return the job whose submission id or Ray job id is ``job_id``.

    Raises:
        ClusterError: no such job on the cluster.
    """
    with _jobs_api_errors(connection.address, "listing jobs"):
        jobs = connection.client.list_jobs()
    for job in jobs:
        if job_id in (job.submission_id, job.job_id):
            return job
    raise ClusterError(
        f"no job {job_id!r} on the Ray cluster at {connection.address}; list the submitted studies with 'hpo jobs'"
    )


def service_jobs(connection: ClusterConnection) -> list[JobDetails]:
    """Return the jobs submitted by ``hpo submit`` (metadata ``hpo.study``), newest first."""
    with _jobs_api_errors(connection.address, "listing jobs"):
        jobs = connection.client.list_jobs()
    selected = [job for job in jobs if STUDY_METADATA_KEY in (job.metadata or {})]
    return sorted(selected, key=lambda job: job.start_time or 0, reverse=True)


def follow_job_logs(connection: ClusterConnection, job_id: str, output: TextIO) -> None:
    """Copy a job's log to ``output`` as it grows, until the job ends."""

    async def copy_chunks() -> None:
        async for chunk in connection.client.tail_job_logs(job_id):
            output.write(chunk)
            output.flush()

    with _jobs_api_errors(connection.address, f"following the log of job {job_id}"):
        asyncio.run(copy_chunks())


def wait_for_job(connection: ClusterConnection, job_id: str, timeout_s: float | None = None) -> JobDetails:
    """Poll a job every POLL_INTERVAL_S until it ends; return it, or raise after ``timeout_s``.

    Raises:
        RunFailedError: the job has not ended after ``timeout_s`` seconds.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        with _jobs_api_errors(connection.address, f"reading the status of job {job_id}"):
            job = connection.client.get_job_info(job_id)
        if status_name(job) in TERMINAL_STATUSES:
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise RunFailedError(
                f"job {job_id} is still {status_name(job)} after {timeout_s:g} s; check it with "
                f"'hpo status {job_id}' or stop it from the dashboard at {connection.address}"
            )
        time.sleep(POLL_INTERVAL_S)


def stop_job(connection: ClusterConnection, job_id: str, timeout_s: float = STOP_TIMEOUT_S) -> JobDetails:
    """Ask Ray to stop a job and wait until it has ended; return the ended job.

    A job that has already ended is returned as it is.

    Raises:
        ClusterError: no such job. RunFailedError: it did not end within ``timeout_s``.
    """
    job = find_job(connection, job_id)
    if status_name(job) in TERMINAL_STATUSES:
        return job
    with _jobs_api_errors(connection.address, f"stopping job {job_id}"):
        connection.client.stop_job(job_id)
    logger.info("asked the Ray cluster at %s to stop job %s", connection.address, job_id)
    return wait_for_job(connection, job_id, timeout_s)


# Output ------------------------------------------------------------------------------------


def _format_time(milliseconds: int | None) -> str:
    if not milliseconds:
        return "-"
    return datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S")


def format_job(job: JobDetails) -> str:
    """Return the details of one job, one 'field: value' line each."""
    metadata = job.metadata or {}
    rows = [
        ("job", job.submission_id or job.job_id),
        ("study", metadata.get(STUDY_METADATA_KEY, "-")),
        ("status", status_name(job)),
        ("message", _one_line(job.message or "-")),
        ("started", _format_time(job.start_time)),
        ("ended", _format_time(job.end_time)),
        ("entrypoint", job.entrypoint),
    ]
    return "\n".join(f"{label + ':':<12}{value}" for label, value in rows)


def format_job_table(jobs: Sequence[JobDetails]) -> str:
    """Return one line per job: submission id, study, status, start and end time."""
    header = ("JOB", "STUDY", "STATUS", "STARTED", "ENDED")
    rows = [
        (
            job.submission_id or job.job_id or "-",
            (job.metadata or {}).get(STUDY_METADATA_KEY, "-"),
            status_name(job),
            _format_time(job.start_time),
            _format_time(job.end_time),
        )
        for job in jobs
    ]
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def format_submission(submitted: SubmittedStudy, address: str) -> str:
    """Return what ``hpo submit`` prints: the job id and where to follow the study."""
    job = submitted.submission_id
    return "\n".join([
        f"submitted study {submitted.study} as Ray job {job}",
        f"  dashboard: {submitted.dashboard_url}",
        f"  MLflow:    {submitted.tracking_uri} (experiment {submitted.experiment})",
        f"  status:    hpo status {job} --address {address}",
        f"  log:       hpo logs {job} --follow --address {address}",
        f"  stop:      hpo stop {job} --address {address}",
    ])


# Command line ------------------------------------------------------------------------------


def _connect_from_args(args: argparse.Namespace) -> ClusterConnection:
    return connect(resolve_address(args.address), resolve_token(args.token_file))


def handle_submit(args: argparse.Namespace) -> int:
    """``hpo submit STUDY``: check the study and the cluster, submit, optionally wait."""
    from orchestrator.spec import load_study

    # Validate the study on this machine
    spec = load_study(args.study)
    check_study_for_cluster(spec)

    # Check the cluster before uploading anything
    connection = _connect_from_args(args)
    nodes = list_alive_nodes(connection.address, connection.token)
    check_resources(spec.name, spec.resources.cpus_per_trial, spec.resources.gpus_per_trial, nodes, connection.address)
    logger.info("the Ray cluster at %s runs Ray %s on %d nodes", connection.address, connection.ray_version, len(nodes))

    # Submit the study driver
    working_dir = Path(args.working_dir) if args.working_dir else None
    submitted = submit_study(connection, Path(args.study), spec, working_dir=working_dir, resume=args.resume)
    print(format_submission(submitted, connection.address), flush=True)
    if not args.wait:
        return 0

    # Follow the driver's log until the job ends
    follow_job_logs(connection, submitted.submission_id, sys.stdout)
    job = wait_for_job(connection, submitted.submission_id)
    status = status_name(job)
    print(f"job {submitted.submission_id}: {status}")
    if status != "SUCCEEDED":
        raise RunFailedError(
            f"job {submitted.submission_id} of study {spec.name} ended {status}: {_one_line(job.message or '')}; "
            f"read its log with 'hpo logs {submitted.submission_id}'"
        )
    return 0


def handle_status(args: argparse.Namespace) -> int:
    """``hpo status [JOB]``: the details of one job, or of every submitted study."""
    connection = _connect_from_args(args)
    if args.job is not None:
        print(format_job(find_job(connection, args.job)))
        return 0
    jobs = service_jobs(connection)
    if not jobs:
        print(f"no studies submitted to the Ray cluster at {connection.address}")
        return 0
    print("\n\n".join(format_job(job) for job in jobs))
    return 0


def handle_logs(args: argparse.Namespace) -> int:
    """``hpo logs JOB [--follow]``: print a job's log, or follow it until the job ends."""
    connection = _connect_from_args(args)
    job = find_job(connection, args.job)
    job_id = job.submission_id or job.job_id
    if args.follow:
        follow_job_logs(connection, job_id, sys.stdout)
        return 0
    with _jobs_api_errors(connection.address, f"reading the log of job {job_id}"):
        sys.stdout.write(connection.client.get_job_logs(job_id))
    sys.stdout.flush()
    return 0


def handle_stop(args: argparse.Namespace) -> int:
    """``hpo stop JOB``: stop a job and wait until Ray reports it ended."""
    connection = _connect_from_args(args)
    job = stop_job(connection, args.job, timeout_s=args.timeout)
    print(f"job {job.submission_id or job.job_id}: {status_name(job)}")
    return 0


def handle_jobs(args: argparse.Namespace) -> int:
    """``hpo jobs``: list the jobs of submitted studies, newest first."""
    connection = _connect_from_args(args)
    jobs = service_jobs(connection)
    if not jobs:
        print(f"no studies submitted to the Ray cluster at {connection.address}")
        return 0
    print(format_job_table(jobs))
    return 0


def _cluster_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--address",
        help=f"dashboard URL of the Ray head node, e.g. http://HEAD:8265 (default: ${ADDRESS_VARIABLE})",
    )
    options.add_argument(
        "--token-file",
        help=f"file with the cluster's authentication token (default: ${TOKEN_VARIABLE}, "
        f"${TOKEN_PATH_VARIABLE}, then {DEFAULT_TOKEN_PATH})",
    )
    return options


def _add_submit(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "submit", parents=parents, help="run a study on a Ray cluster as a Ray job",
        description="Check the study and the cluster, then submit 'hpo run STUDY' as a Ray job.",
    )
    parser.add_argument("study", help="study file (YAML); its tracking.uri must be an MLflow server")
    parser.add_argument(
        "--wait", action=argparse.BooleanOptionalAction, default=False,
        help="follow the job's log until it ends, and exit with 1 unless it succeeded (default: --no-wait)",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted run of the study instead of starting it (runs 'hpo run STUDY --resume')",
    )
    parser.add_argument(
        "--working-dir",
        help="directory to upload as the job's working directory; it must contain the study file "
        "(default: only the study file and its search space file)",
    )
    parser.set_defaults(handler=handle_submit)


def _add_status(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status", parents=parents, help="show the status of a submitted study's job, or of all of them",
    )
    parser.add_argument("job", nargs="?", help="submission id printed by 'hpo submit' (default: every study job)")
    parser.set_defaults(handler=handle_status)


def _add_logs(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("logs", parents=parents, help="print the log of a job")
    parser.add_argument("job", help="submission id printed by 'hpo submit'")
    parser.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    parser.set_defaults(handler=handle_logs)


def _add_stop(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("stop", parents=parents, help="stop a job and wait until it has ended")
    parser.add_argument("job", help="submission id printed by 'hpo submit'")
    parser.add_argument(
        "--timeout", type=float, default=STOP_TIMEOUT_S,
        help=f"seconds to wait for the job to end (default: {STOP_TIMEOUT_S:g})",
    )
    parser.set_defaults(handler=handle_stop)


def _add_jobs(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("jobs", parents=parents, help="list the jobs of submitted studies")
    parser.set_defaults(handler=handle_jobs)


PARSER_BUILDERS = {
    "submit": _add_submit,
    "status": _add_status,
    "logs": _add_logs,
    "stop": _add_stop,
    "jobs": _add_jobs,
}


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the cluster commands (submit, status, logs, stop, jobs) on the ``hpo`` parser."""
    parents = [_cluster_options()]
    for build in PARSER_BUILDERS.values():
        build(subparsers, parents)
