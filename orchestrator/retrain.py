"""Retrain the winners: one Ray task per (cell, eta, seed), results collected on the driver.

Each task runs ``trainables.train.retrain`` on the cell's full training set, which reaches
the worker through Ray's object store, and returns plain data. Ray retries a task whose
worker process died; the task itself continues from its last epoch checkpoint when the
study's storage is a local or shared filesystem.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from trainables.train import TrainingSetup, retrain

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainJob:
    """One retrain: a winner's hyperparameters under one noise level and one seed."""

    key: str
    setup: TrainingSetup
    hyperparameters: dict[str, Any]
    eta: float
    seed: int
    noise_seed: int
    noise_kind: str
    checkpoint_dir: str | None = None


@dataclass(frozen=True)
class RetrainOutcome:
    """What came back for one job: a result, or the error that ended its last attempt."""

    job: RetrainJob
    result: dict[str, Any] | None
    error: str | None = None


def _run_retrain(job: RetrainJob, data) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO)
    return retrain(
        job.setup,
        job.hyperparameters,
        data,
        eta=job.eta,
        seed=job.seed,
        noise_seed=job.noise_seed,
        noise_kind=job.noise_kind,
        checkpoint_dir=job.checkpoint_dir,
    )


def run_retrains(
    jobs: Iterable[RetrainJob],
    data_ref: ray.ObjectRef,
    *,
    cpus: float,
    gpus: float,
    max_retries: int,
    on_done: Callable[[RetrainOutcome], None] | None = None,
) -> Iterator[RetrainOutcome]:
    """Run the jobs in parallel on the cluster and yield each outcome as it finishes.

    A task that raises or whose worker dies is retried up to ``max_retries`` times by Ray;
    after that its outcome carries the error instead of a result, and the other jobs go on.
    """
    task = ray.remote(_run_retrain).options(
        num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=True
    )
    pending = {task.remote(job, data_ref): job for job in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            job = pending.pop(ref)
            try:
                outcome = RetrainOutcome(job, ray.get(ref))
            except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError) as err:
                message = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
                logger.error("retrain %s failed after %d retries: %s", job.key, max_retries, message)
                outcome = RetrainOutcome(job, None, message)
            if on_done is not None:
                on_done(outcome)
            yield outcome


def checkpoint_directory(storage_path: str, cell_key: str, eta: float, seed: int) -> str | None:
    """Return where a retrain saves its epochs, or None when storage is not a filesystem.

    NOTE: with a cloud storage URI (s3://, gs://) retrains keep no checkpoint and a retried
    task starts again from its first epoch.
    """
    if "://" in storage_path and not storage_path.startswith("file://"):
        return None
    root = Path(storage_path.removeprefix("file://"))
    return str(root / "retrain" / cell_key / f"eta{eta:g}-seed{seed}")
