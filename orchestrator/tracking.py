"""Everything the service writes to MLflow; no other module writes there.

Only the driver process logs. Trials and retrain tasks return plain results, and the
Tune callback and the retrain collector hand them to a ``Tracker`` here. So workers need no
MLflow access, a SQLite store never has two writers, and a dead worker cannot leave a run
RUNNING.

Run hierarchy (one experiment per study):

    study run              tags: study, phase=study
      cell run             tags: study, phase=cell, dataset, model, loss
        trial run          tags: ... phase=tune, trial_id; metrics per epoch, step = epoch
        retrain run        tags: ... phase=retrain, eta, seed; test_accuracy as a fraction

Every run gets a fresh MLflow run; params are never rewritten. Nested configurations go
into a JSON artifact because MLflow limits the length of a param value.

When the store is unreachable, writes wait in a buffer and a journal file and are
delivered with backoff once it responds again (see ``Tracker``). MLflow's own clients
retry for minutes before they fail, so this module lowers their limits to let the
``Tracker`` decide: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 0, ``MLFLOW_HTTP_REQUEST_TIMEOUT``
10 s and libpq's ``PGCONNECT_TIMEOUT`` 10 s, unless the environment sets them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from orchestrator.errors import TrackingError
from orchestrator.reliability import (
    RetryPolicy,
    TrackingJournal,
    TrackingUnavailableError,
    elapsed_since,
    interruptible_sleep,
    is_transient_tracking_error,
    outage_limit_from_environment,
)
from orchestrator.submit import submitted_job_id

logger = logging.getLogger(__name__)

# MLflow's REST client retries 7 times with backoff (minutes) and waits 120 s per request;
# the Tracker retries on its own, so each request fails fast here.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# libpq (psycopg2) waits for the operating system's TCP timeout, minutes, on an unreachable
# PostgreSQL host unless this is set.
os.environ.setdefault("PGCONNECT_TIMEOUT", "10")

PHASE_STUDY = "study"
PHASE_CELL = "cell"
PHASE_TUNE = "tune"
PHASE_RETRAIN = "retrain"
PACKAGES = ("torch", "torchvision", "ray", "mlflow", "scikit-optimize", "hpbandster", "ConfigSpace", "numpy")
MAX_PARAM_LENGTH = 500
BATCH_LIMIT = 900
# Prefix of the run reference that ``Tracker.start_run`` returns while the store is away.
PENDING_PREFIX = "pending:"
# Tag with the client-side key of each run, used to find a run whose creation response was lost.
RUN_KEY_TAG = "run_key"
# Seconds between two warnings about the same outage.
WARNING_INTERVAL_S = 30.0


def is_database_uri(uri: str) -> bool:
    """Tell whether ``uri`` is a SQLAlchemy URL that MLflow opens directly."""
    return uri.split(":", 1)[0].split("+", 1)[0] in {"sqlite", "postgresql", "mysql", "mssql"}


def check_store_reachable(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingError unless the tracking store at ``uri`` responds within ``timeout`` s.

    SQLite needs a writable directory; other databases must accept a connection; an MLflow
    server must respond on its ``/health`` endpoint. The check is done here, quickly, because
    MLflow's own clients retry a refused connection for minutes before failing.
    """
    scheme = uri.split(":", 1)[0]
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(
                f"cannot create the directory of the tracking store {uri}: {err}; "
                "set tracking.uri to a writable location"
            ) from err
        return
    if is_database_uri(uri):
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri, connect_args=_connect_timeout(uri, timeout))
        try:
            with engine.connect():
                pass
        except sqlalchemy.exc.SQLAlchemyError as err:
            reason = str(err.orig if getattr(err, "orig", None) else err).strip().splitlines()[0]
            raise TrackingError(
                f"cannot connect to the tracking store {redact_uri(uri)}: {reason}; "
                "check tracking.uri and that the database server runs"
            ) from err
        finally:
            engine.dispose()
        return
    if scheme in {"http", "https"}:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"cannot reach the MLflow server at {redact_uri(uri)}: {reason}; "
                "check tracking.uri and that 'mlflow server' runs there"
            ) from err
        return
    raise TrackingError(
        f"unsupported tracking URI {redact_uri(uri)}; use sqlite:///PATH, "
        "postgresql://USER@HOST/DB or http://HOST:PORT of an MLflow server"
    )


def _connect_timeout(uri: str, timeout: float) -> dict[str, Any]:
    if uri.startswith("postgresql"):
        return {"connect_timeout": int(timeout)}
    if uri.startswith("mysql"):
        return {"connect_timeout": int(timeout)}
    return {}


def redact_uri(uri: str) -> str:
    """Return ``uri`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}{port}"))


def package_versions() -> dict[str, str]:
    """Return the installed versions of the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(directory: Path | None = None) -> str:
    """Return the git commit of the service's source tree, or 'unknown' outside git."""
    directory = directory or Path(__file__).resolve().parent
    try:
        output = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return output.stdout.strip() if output.returncode == 0 else "unknown"


def scalar_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params, keeping only scalar values.

    Lists and values longer than MLflow's limit are left out; the JSON artifact logged
    next to them contains the whole config.
    """
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            params.update(scalar_params(value, prefix=f"{name}."))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            text = str(plain(value))
            if len(text) <= MAX_PARAM_LENGTH:
                params[name] = text
    return params


def plain(value: Any) -> Any:
    """Convert numpy scalars and containers to plain Python values for logging."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


class Tracker:
    """Writes a study's runs to one MLflow experiment through an explicit client.

    The tracking URI is passed to ``MlflowClient`` instead of being set globally, so nothing
    lands in a stray ``mlruns/`` folder. For database stores the experiment's artifacts go
    to ``artifact_root``.

    Writes go through a first-in first-out buffer. While the store responds, each write is
    delivered at once. While it is unreachable, writes wait in the buffer, and in the
    journal file once ``enable_journal`` has set one, and delivery is retried with
    exponential backoff on later writes. ``flush`` and every read wait for the buffer to
    empty. When the store stays unreachable for longer than the retry policy's
    ``limit_s``, ``outage_exceeded`` turns true and blocking calls raise
    ``TrackingUnavailableError``; the writes stay in the journal for ``--resume``.

    ``start_run`` returns the MLflow run id, or a ``pending:`` reference while the store
    is unreachable. Every method accepts both; ``run_id`` turns a reference into the id.
    Every created run carries a ``run_key`` tag, so a creation whose response was lost is
    found again instead of being repeated.
    """

    def __init__(self, uri: str, experiment: str, study: str, artifact_root: Path | None = None,
                 *, retry_policy: RetryPolicy | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.study = study
        self.client = MlflowClient(tracking_uri=uri)
        self.policy = retry_policy or RetryPolicy(limit_s=outage_limit_from_environment())
        self.journal: TrackingJournal | None = None
        self.dropped: list[str] = []
        self._pending: deque[dict[str, Any]] = deque()
        self._unwritten = 0
        self._journal_stale = False
        self._run_ids: dict[str, str] = {}
        self._outage_since: float | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self._last_warning = 0.0
        self.experiment_id = self._ensure_experiment(experiment, artifact_root)

    def _ensure_experiment(self, name: str, artifact_root: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        try:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    self.client.restore_experiment(experiment.experiment_id)
                return experiment.experiment_id
            location = None
            if is_database_uri(self.uri) and artifact_root is not None:
                location = artifact_root.resolve().as_uri()
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            raise TrackingError(
                f"cannot open experiment '{name}' in {redact_uri(self.uri)}: {err.message}; "
                "check tracking.uri and that the store's schema is current (mlflow db upgrade)"
            ) from err

    # Buffer, journal and outages --------------------------------------------------------

    def enable_journal(self, path: Path) -> int:
        """Keep undelivered writes in ``path`` and deliver what an earlier run left there.

        Returns the number of writes found in the journal. Raises TrackingUnavailableError
        when the store does not respond within the outage limit.
        """
        self.journal = TrackingJournal(path)
        left = self.journal.load()
        if left:
            logger.info("delivering %d tracking writes that an interrupted run kept in %s", len(left), path)
            for operation in left:
                operation["replayed"] = True
            self._pending.extendleft(reversed(left))
            self._journal_stale = True
            self.flush()
        return len(left)

    def outage_exceeded(self) -> bool:
        """Return whether the store has been unreachable for longer than the outage limit."""
        return self._outage_since is not None and elapsed_since(self._outage_since) > self.policy.limit_s

    def check_available(self) -> None:
        """Raise TrackingUnavailableError once the outage limit has passed."""
        if self.outage_exceeded():
            raise self._unavailable_error()

    def pending_writes(self) -> int:
        """Number of writes not yet delivered to the store."""
        return len(self._pending)

    def flush(self) -> None:
        """Deliver every buffered write, waiting with backoff while the store is unreachable.

        Raises TrackingUnavailableError after the outage limit.
        """
        self._drain(block=True)

    def close(self) -> None:
        """Try once more to deliver buffered writes and keep the rest in the journal."""
        if self._pending and not self.outage_exceeded():
            self._next_attempt = 0.0
        self._drain(block=False)
        self._sync_journal(force=True)
        if self._pending:
            where = self.journal.path if self.journal is not None else "memory only: they are lost"
            logger.error("%d tracking writes could not be delivered to %s; kept in %s",
                         len(self._pending), redact_uri(self.uri), where)

    def run_id(self, run: str) -> str:
        """Return the MLflow run id of ``run`` (an id or a ``pending:`` reference)."""
        if run.startswith(PENDING_PREFIX) and run[len(PENDING_PREFIX):] not in self._run_ids:
            self.flush()
        return self._resolve(run)

    def _resolve(self, run: str) -> str:
        if not run.startswith(PENDING_PREFIX):
            return run
        key = run[len(PENDING_PREFIX):]
        if key not in self._run_ids:
            raise TrackingError(f"run reference {run} was never created in {redact_uri(self.uri)}; "
                                "resume the study to create its runs again")
        return self._run_ids[key]

    def _submit(self, operation: dict[str, Any]) -> None:
        self._pending.append(operation)
        self._unwritten += 1
        self._drain(block=False)

    def _drain(self, block: bool) -> None:
        """Deliver buffered writes in order; without ``block`` stop at the first failure."""
        while self._pending:
            wait = self._next_attempt - time.monotonic()
            if wait > 0:
                if not block:
                    break
                interruptible_sleep(wait)
            operation = self._pending[0]
            try:
                self._apply(operation)
            except Exception as err:
                if not is_transient_tracking_error(err):
                    self._pop_front()
                    self._permanent_failure(operation, err)
                    continue
                self._note_failure(err)
                if self.outage_exceeded():
                    self._sync_journal()
                    if block:
                        raise self._unavailable_error() from err
                    break
                continue
            self._pop_front()
            self._note_success()
        self._sync_journal()

    def _pop_front(self) -> None:
        if self._unwritten >= len(self._pending):
            self._unwritten = len(self._pending) - 1
        else:
            self._journal_stale = True
        self._pending.popleft()

    def _sync_journal(self, force: bool = False) -> None:
        """Make the journal file contain exactly the waiting writes (no file when none wait).

        Writes that wait outside an outage (a stop signal interrupted their delivery) are
        written only with ``force``.
        """
        if self.journal is None:
            return
        if not self._pending:
            if self._journal_stale or self._unwritten:
                self.journal.clear()
            self._unwritten = 0
            self._journal_stale = False
            return
        if self._outage_since is None and not self._journal_stale and not force:
            return
        if self._journal_stale:
            self.journal.replace(self._pending)
        else:
            self.journal.append(list(self._pending)[len(self._pending) - self._unwritten:])
        self._unwritten = 0
        self._journal_stale = False

    def _note_failure(self, error: BaseException) -> None:
        now = time.monotonic()
        reason = _short_error(error)
        if self._outage_since is None:
            self._outage_since = now
            self._failures = 0
            self._last_warning = now
            logger.warning(
                "tracking store %s unreachable (%s); buffering %d writes and retrying for up to %.0f s",
                redact_uri(self.uri), reason, len(self._pending), self.policy.limit_s,
            )
        elif now - self._last_warning >= WARNING_INTERVAL_S:
            self._last_warning = now
            logger.warning("tracking store %s still unreachable after %.0f s (%s); %d writes waiting",
                           redact_uri(self.uri), now - self._outage_since, reason, len(self._pending))
        self._failures += 1
        self._next_attempt = now + self.policy.delay(self._failures)

    def _note_success(self) -> None:
        if self._outage_since is not None:
            logger.warning(
                "tracking store %s reachable again after %.0f s; delivering %d buffered writes",
                redact_uri(self.uri), elapsed_since(self._outage_since), len(self._pending),
            )
        self._outage_since = None
        self._failures = 0
        self._next_attempt = 0.0

    def _permanent_failure(self, operation: Mapping[str, Any], error: BaseException) -> None:
        description = f"{operation['op']} on run {operation.get('run', operation.get('key'))}: {_short_error(error)}"
        if operation.get("replayed"):
            logger.error("dropping a journaled tracking write that the store rejects: %s", description)
            self.dropped.append(description)
            return
        raise TrackingError(f"the tracking store {redact_uri(self.uri)} rejected {description}") from error

    def _unavailable_error(self) -> TrackingUnavailableError:
        kept = self.journal.path if self.journal is not None else "memory"
        return TrackingUnavailableError(
            f"tracking store {redact_uri(self.uri)} unreachable for {elapsed_since(self._outage_since):.0f} s "
            f"(limit {self.policy.limit_s:.0f} s, set tracking.outage_limit_s in the study file to wait longer); "
            f"{len(self._pending)} writes are kept in {kept}; resume the study once the store responds"
        )

    def _read(self, function: Any, description: str, wait: bool = True) -> Any:
        """Call a read of the store after a flush, retrying with backoff while it is unreachable.

        Without ``wait`` a transient failure raises TrackingUnavailableError at once.
        """
        self._drain(block=wait)
        if self._pending:
            raise self._unavailable_error()
        while True:
            try:
                result = function()
            except Exception as err:
                if not is_transient_tracking_error(err):
                    raise TrackingError(
                        f"cannot read {description} from {redact_uri(self.uri)}: {_short_error(err)}"
                    ) from err
                self._note_failure(err)
                if self.outage_exceeded() or not wait:
                    raise self._unavailable_error() from err
                interruptible_sleep(max(0.0, self._next_attempt - time.monotonic()))
                continue
            self._note_success()
            return result

    # Delivery of one write ----------------------------------------------------------------

    def _apply(self, operation: Mapping[str, Any]) -> None:
        APPLIERS[operation["op"]](self, operation)

    def _apply_create_run(self, operation: dict[str, Any]) -> None:
        key = operation["key"]
        if operation.get("attempted") or operation.get("replayed"):
            # An earlier attempt may have created the run before its response was lost.
            found = self.client.search_runs([self.experiment_id], f"tags.{RUN_KEY_TAG} = '{key}'",
                                            max_results=1)
            if found:
                self._run_ids[key] = found[0].info.run_id
                return
        operation["attempted"] = True
        tags = dict(operation["tags"])
        tags[RUN_KEY_TAG] = key
        if operation.get("parent"):
            tags["mlflow.parentRunId"] = self._resolve(operation["parent"])
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=operation["name"],
                                     start_time=operation.get("time"))
        self._run_ids[key] = run.info.run_id

    def _apply_log_batch(self, operation: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.client.log_batch(
            self._resolve(operation["run"]),
            metrics=[Metric(key, value, timestamp, step) for key, value, timestamp, step in operation.get("metrics", [])],
            params=[Param(key, value) for key, value in operation.get("params", [])],
            tags=[RunTag(key, value) for key, value in operation.get("tags", [])],
        )

    def _apply_terminate(self, operation: Mapping[str, Any]) -> None:
        self.client.set_terminated(self._resolve(operation["run"]), status=operation["status"],
                                   end_time=operation.get("time"))

    def _apply_set_status(self, operation: Mapping[str, Any]) -> None:
        self.client.update_run(self._resolve(operation["run"]), status=operation["status"])

    def _apply_delete(self, operation: Mapping[str, Any]) -> None:
        self.client.delete_run(self._resolve(operation["run"]))

    def _apply_log_dict(self, operation: Mapping[str, Any]) -> None:
        self.client.log_dict(self._resolve(operation["run"]), operation["data"], operation["path"])

    def _apply_log_artifact(self, operation: Mapping[str, Any]) -> None:
        self.client.log_artifact(self._resolve(operation["run"]), operation["path"], operation.get("artifact_path"))

    # Runs -----------------------------------------------------------------------------

    def start_run(self, name: str, tags: Mapping[str, Any], parent_id: str | None = None) -> str:
        """Create a RUNNING run with ``tags`` (and the study tag) and return its id or reference."""
        key = uuid.uuid4().hex
        run_tags = {"study": self.study, **{key_: str(plain(value)) for key_, value in tags.items()}}
        self._submit({"op": "create_run", "key": key, "name": name, "tags": run_tags, "parent": parent_id,
                      "time": _now_ms()})
        return self._run_ids.get(key, PENDING_PREFIX + key)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        self._submit({"op": "terminate", "run": run_id, "status": status, "time": _now_ms()})

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status without an end time, e.g. RUNNING again when a study resumes."""
        self._submit({"op": "set_status", "run": run_id, "status": status})

    def delete_run(self, run_id: str) -> None:
        """Move a run to MLflow's deleted runs (it can be restored from there)."""
        self._submit({"op": "delete", "run": run_id})

    def find_runs(self, filter_string: str, statuses: Iterable[str] | None = None, wait: bool = True) -> list[Any]:
        """Return this study's runs matching an MLflow filter, all pages, oldest first.

        Waits with backoff while the store is unreachable, or with ``wait`` False raises
        TrackingUnavailableError at the first failure.
        """
        query = f"tags.study = '{self.study}'"
        if filter_string:
            query += f" and {filter_string}"

        def search() -> list[Any]:
            runs: list[Any] = []
            token = None
            while True:
                page = self.client.search_runs(
                    [self.experiment_id], query, max_results=1000, page_token=token,
                    order_by=["attributes.start_time ASC"],
                )
                runs.extend(page)
                token = page.token
                if not token:
                    return runs

        runs = self._read(search, f"runs matching {query!r}", wait=wait)
        if statuses is not None:
            wanted = set(statuses)
            runs = [run for run in runs if run.info.status in wanted]
        return runs

    def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        """Return the values of metric ``key`` of a run by step (the last value per step)."""
        history = self._read(lambda: self.client.get_metric_history(self.run_id(run_id), key),
                             f"metric {key} of run {run_id}")
        return {int(metric.step): float(metric.value) for metric in sorted(history, key=lambda m: m.timestamp)}

    def log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        """Log the scalar values of ``config`` as params and the whole as ``config.json``."""
        params = [[key, value] for key, value in scalar_params(config).items()]
        for start in range(0, len(params), 100):
            self._submit({"op": "log_batch", "run": run_id, "params": params[start : start + 100]})
        self.log_dict(run_id, dict(config), "config.json")

    def log_dict(self, run_id: str, data: Mapping[str, Any], path: str) -> None:
        """Log ``data`` as the JSON artifact ``path`` of a run."""
        self._submit({"op": "log_dict", "run": run_id, "data": plain(dict(data)), "path": path})

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log numeric metrics at ``step``; booleans become 0/1, other values are skipped."""
        timestamp = _now_ms()
        entries = []
        for key, value in metrics.items():
            value = plain(value)
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)):
                entries.append([key, float(value), timestamp, int(step)])
        self._submit_metrics(run_id, entries)

    def log_history(self, run_id: str, history: Iterable[Mapping[str, Any]], keys: Mapping[str, str]) -> None:
        """Log per-epoch metrics with step = epoch, renaming ``keys`` (source -> logged)."""
        timestamp = _now_ms()
        entries = []
        for row in history:
            step = int(row["epoch"])
            for source, target in keys.items():
                value = plain(row.get(source))
                if isinstance(value, bool):
                    value = float(value)
                if isinstance(value, (int, float)):
                    entries.append([target, float(value), timestamp, step])
        self._submit_metrics(run_id, entries)

    def _submit_metrics(self, run_id: str, entries: list[list[Any]]) -> None:
        for start in range(0, len(entries), BATCH_LIMIT):
            self._submit({"op": "log_batch", "run": run_id, "metrics": entries[start : start + BATCH_LIMIT]})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        entries = [[key, str(plain(value))] for key, value in tags.items()]
        for start in range(0, len(entries), 100):
            self._submit({"op": "log_batch", "run": run_id, "tags": entries[start : start + 100]})

    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self._submit({"op": "log_artifact", "run": run_id, "path": str(Path(path).resolve()),
                          "artifact_path": artifact_path})

    # Study-level records --------------------------------------------------------------

    def start_study(self, config: Mapping[str, Any]) -> str:
        """Create the study run with the resolved config, versions and git commit."""
        run_id = self.start_run(self.study, {"phase": PHASE_STUDY})
        self.log_params(run_id, config)
        tags = {f"version.{name}": version for name, version in package_versions().items()}
        tags["git_commit"] = git_commit()
        job_id = submitted_job_id() or os.environ.get("RAY_JOB_ID")
        if job_id:
            tags["ray_job_id"] = job_id
        self.set_tags(run_id, tags)
        return run_id

    def log_retrain(self, cell_run_id: str, cell_tags: Mapping[str, str], eta: float, seed: int,
                    hyperparameters: Mapping[str, Any], result: Mapping[str, Any],
                    extra_tags: Mapping[str, Any] | None = None) -> str:
        """Record one finished retrain as a new child run of its cell and return its id."""
        tags = {**cell_tags, "phase": PHASE_RETRAIN, "eta": repr(float(eta)), "seed": str(int(seed)),
                **dict(extra_tags or {})}
        name = f"retrain-eta{float(eta):g}-seed{int(seed)}"
        run_id = self.start_run(name, tags, parent_id=cell_run_id)
        noise = result["noise"]
        self.log_params(run_id, {
            **dict(hyperparameters), "eta": float(eta), "seed": int(seed),
            "noise_kind": noise["kind"], "noise_seed": noise["seed"], "noise_sha256": noise["sha256"],
        })
        self.log_history(run_id, result["history"], {
            "train_loss": "train_loss", "train_accuracy": "train_accuracy",
            "eval_loss": "test_loss_curve", "eval_accuracy": "test_accuracy_curve",
            "learning_rate": "learning_rate", "epoch_seconds": "epoch_seconds",
            "samples_per_second": "samples_per_second",
        })
        self.log_metrics(run_id, {
            "test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
            "epochs": result["epochs"], "diverged": result["diverged"],
            "nc1_train": result["nc1_train"], "nc1_test": result["nc1_test"],
            "dilation": result["dilation"], "memorization": result["memorization"],
            "noise_flip_rate": noise["flip_rate"], "noise_num_flipped": noise["num_flipped"],
            "retrain_seconds": result["seconds"],
        }, step=int(result["epochs"]))
        self.end_run(run_id, "FINISHED")
        return run_id


APPLIERS: dict[str, Any] = {
    "create_run": Tracker._apply_create_run,
    "log_batch": Tracker._apply_log_batch,
    "terminate": Tracker._apply_terminate,
    "set_status": Tracker._apply_set_status,
    "delete": Tracker._apply_delete,
    "log_dict": Tracker._apply_log_dict,
    "log_artifact": Tracker._apply_log_artifact,
}
"""Delivery functions of the buffered writes, keyed by their ``op`` name."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(data), indent=2, sort_keys=True))
    return path
