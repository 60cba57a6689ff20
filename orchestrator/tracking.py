"""Everything the service writes to MLflow; no other module writes there.

Only the driver process logs. Trials and retrain tasks return plain results, and the
Tune callback and the retrain collector hand them to a ``Tracker`` here. So workers need no
MLflow access, a SQLite store never sees two writers, and a dead worker cannot leave a run
RUNNING.

Run hierarchy (one experiment per study):

    study run              tags: study, phase=study
      cell run             tags: study, phase=cell, dataset, model, loss
        trial run          tags: ... phase=tune, trial_id; metrics per epoch, step = epoch
        retrain run        tags: ... phase=retrain, eta, seed; test_accuracy as a fraction

Every run gets a fresh MLflow run; params are never rewritten. Nested configurations go
into a JSON artifact because MLflow limits the length of a param value.
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
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestrator.errors import TrackingError

logger = logging.getLogger(__name__)

PHASE_STUDY = "study"
PHASE_CELL = "cell"
PHASE_TUNE = "tune"
PHASE_RETRAIN = "retrain"
PACKAGES = ("torch", "torchvision", "ray", "mlflow", "scikit-optimize", "hpbandster", "ConfigSpace", "numpy")
MAX_PARAM_LENGTH = 500
BATCH_LIMIT = 900


def is_database_uri(uri: str) -> bool:
    """Tell whether ``uri`` is a SQLAlchemy URL that MLflow opens directly."""
    return uri.split(":", 1)[0].split("+", 1)[0] in {"sqlite", "postgresql", "mysql", "mssql"}


def check_store_reachable(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingError unless the tracking store at ``uri`` answers within ``timeout`` s.

    SQLite needs a writable directory; other databases must accept a connection; an MLflow
    server must answer its ``/health`` endpoint. The check is done here, quickly, because
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
                f"cannot connect to the tracking store {_redact(uri)}: {reason}; "
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
                f"cannot reach the MLflow server at {_redact(uri)}: {reason}; "
                "check tracking.uri and that 'mlflow server' runs there"
            ) from err
        return
    raise TrackingError(
        f"unsupported tracking URI {_redact(uri)}; use sqlite:///PATH, "
        "postgresql://USER@HOST/DB or http://HOST:PORT of an MLflow server"
    )


def _connect_timeout(uri: str, timeout: float) -> dict[str, Any]:
    if uri.startswith("postgresql"):
        return {"connect_timeout": int(timeout)}
    if uri.startswith("mysql"):
        return {"connect_timeout": int(timeout)}
    return {}


def _redact(uri: str) -> str:
    """Hide a password in a URI before it is printed or logged."""
    if "@" not in uri or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else uri


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
    next to them holds the whole config.
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
    """

    def __init__(self, uri: str, experiment: str, study: str, artifact_root: Path | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.study = study
        self.client = MlflowClient(tracking_uri=uri)
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
                f"cannot open experiment '{name}' in {_redact(self.uri)}: {err.message}; "
                "check tracking.uri and that the store's schema is current (mlflow db upgrade)"
            ) from err

    # Runs -----------------------------------------------------------------------------

    def start_run(self, name: str, tags: Mapping[str, Any], parent_id: str | None = None) -> str:
        """Create a RUNNING run with ``tags`` (and the study tag) and return its id."""
        run_tags = {"study": self.study, **{key: str(plain(value)) for key, value in tags.items()}}
        if parent_id is not None:
            run_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=run_tags, run_name=name)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)

    def find_runs(self, filter_string: str, statuses: Iterable[str] | None = None) -> list[Any]:
        """Return this study's runs matching an MLflow filter, all pages, oldest first."""
        query = f"tags.study = '{self.study}'"
        if filter_string:
            query += f" and {filter_string}"
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
                break
        if statuses is not None:
            wanted = set(statuses)
            runs = [run for run in runs if run.info.status in wanted]
        return runs

    def log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        """Log the scalar values of ``config`` as params and the whole as ``config.json``."""
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in scalar_params(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[start : start + 100])
        self.client.log_dict(run_id, plain(dict(config)), "config.json")

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log numeric metrics at ``step``; booleans become 0/1, other values are skipped."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            value = plain(value)
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)):
                entries.append(Metric(key, float(value), timestamp, step))
        for start in range(0, len(entries), BATCH_LIMIT):
            self.client.log_batch(run_id, metrics=entries[start : start + BATCH_LIMIT])

    def log_history(self, run_id: str, history: Iterable[Mapping[str, Any]], keys: Mapping[str, str]) -> None:
        """Log per-epoch metrics with step = epoch, renaming ``keys`` (source -> logged)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = []
        for row in history:
            step = int(row["epoch"])
            for source, target in keys.items():
                value = plain(row.get(source))
                if isinstance(value, bool):
                    value = float(value)
                if isinstance(value, (int, float)):
                    entries.append(Metric(target, float(value), timestamp, step))
        for start in range(0, len(entries), BATCH_LIMIT):
            self.client.log_batch(run_id, metrics=entries[start : start + BATCH_LIMIT])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(key, str(plain(value))) for key, value in tags.items()]
        self.client.log_batch(run_id, tags=entries)

    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path)

    # Study-level records --------------------------------------------------------------

    def start_study(self, config: Mapping[str, Any]) -> str:
        """Create the study run with the resolved config, versions and git commit."""
        run_id = self.start_run(self.study, {"phase": PHASE_STUDY})
        self.log_params(run_id, config)
        tags = {f"version.{name}": version for name, version in package_versions().items()}
        tags["git_commit"] = git_commit()
        job_id = os.environ.get("HPO_RAY_JOB_ID") or os.environ.get("RAY_JOB_ID")
        if job_id:
            tags["ray_job_id"] = job_id
        self.set_tags(run_id, tags)
        return run_id

    def log_retrain(self, cell_run_id: str, cell_tags: Mapping[str, str], eta: float, seed: int,
                    hyperparameters: Mapping[str, Any], result: Mapping[str, Any]) -> str:
        """Record one finished retrain as a new child run of its cell and return its id."""
        tags = {**cell_tags, "phase": PHASE_RETRAIN, "eta": repr(float(eta)), "seed": str(int(seed))}
        name = f"retrain-eta{float(eta):g}-seed{int(seed)}"
        run_id = self.start_run(name, tags, parent_id=cell_run_id)
        try:
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
        except Exception:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")
        return run_id


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(data), indent=2, sort_keys=True))
    return path
