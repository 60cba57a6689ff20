"""Retrain the winners: one Ray task per (cell, eta, seed), results collected on the driver.

Each task runs ``trainables.train.retrain`` on the cell's full training set, which reaches
the worker through Ray's object store, and returns plain data. The task saves a checkpoint
after every epoch when the study's storage is a local or shared filesystem.

Retries happen on the driver, not through Ray's ``max_retries``. A failed task (its code
raised, or its worker process or node died) is submitted again with the same checkpoint
directory, up to ``max_retries`` times, and continues from its last epoch. A task whose
code raises the same error twice in a row is not retried again, and its outcome carries
the error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from orchestrator.reliability import FailureHistory, describe_failure, raise_if_stopped, stop_requested
from trainables.allocator import keep_freed_memory
from trainables.train import CHECKPOINT_FILE, TrainingSetup, retrain

logger = logging.getLogger(__name__)

# Seconds between two checks for a stop request while retrains run.
WAIT_INTERVAL_S = 1.0


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
    """Outcome of one job: a result, or the error that ended its last attempt.

    ``attempts`` counts the task submissions, so ``attempts - 1`` retries happened.
    ``deterministic`` is set when the job stopped because its error repeated.
    """

    job: RetrainJob
    result: dict[str, Any] | None
    error: str | None = None
    attempts: int = 1
    deterministic: bool = False

    @property
    def retries(self) -> int:
        return self.attempts - 1


def _run_retrain(job: RetrainJob, data, retrain_function: Callable[..., dict[str, Any]] = retrain) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO)
    keep_freed_memory()
    if job.checkpoint_dir is not None:
        repair_checkpoint(job.checkpoint_dir)
    return retrain_function(
        job.setup,
        job.hyperparameters,
        data,
        eta=job.eta,
        seed=job.seed,
        noise_seed=job.noise_seed,
        noise_kind=job.noise_kind,
        checkpoint_dir=job.checkpoint_dir,
    )


def repair_checkpoint(directory: str | os.PathLike) -> None:
    """Remove a retrain checkpoint that cannot be read, so the retrain starts afresh.

    ``Trainer.save`` replaces its file atomically, so only a damaged disk or a file from
    another version of the service makes a checkpoint unreadable.
    """
    trainer_path = Path(directory) / CHECKPOINT_FILE
    if not trainer_path.exists():
        return
    try:
        torch.load(trainer_path, map_location="cpu", weights_only=False)["epoch"]
    except Exception as err:  # any unreadable file means the checkpoint cannot be used
        logger.warning("retrain checkpoint %s is unreadable (%s); starting from the first epoch", directory, err)
        trainer_path.unlink(missing_ok=True)


def run_retrains(
    jobs: Iterable[RetrainJob],
    data_ref: ray.ObjectRef,
    *,
    cpus: float,
    gpus: float,
    max_retries: int,
    on_done: Callable[[RetrainOutcome], None] | None = None,
    retrain_function: Callable[..., dict[str, Any]] = retrain,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[RetrainOutcome]:
    """Run the jobs in parallel on the cluster and yield each outcome as it finishes.

    A job that fails is submitted again up to ``max_retries`` times and continues from its
    checkpoint. A job whose code raises the same error twice in a row is not retried. A job
    that is not retried yields an outcome with the error instead of a result, and the other
    jobs go on.
    ``retrain_function`` replaces ``trainables.train.retrain`` (tests inject failures with
    it). When ``should_stop`` returns true the remaining tasks are cancelled and the
    iteration ends; after a stop signal they are cancelled and ``StudyInterrupted`` raised.
    """
    task = ray.remote(_run_retrain).options(num_cpus=cpus, num_gpus=gpus, max_retries=0, retry_exceptions=False)
    history = FailureHistory()
    attempts: dict[str, int] = {}

    def submit(job: RetrainJob) -> ray.ObjectRef:
        attempts[job.key] = attempts.get(job.key, 0) + 1
        return task.remote(job, data_ref, retrain_function)

    pending = {submit(job): job for job in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_INTERVAL_S)
        if stop_requested() is not None or (should_stop is not None and should_stop()):
            logger.warning("stopping %d retrains that have not finished", len(pending))
            for ref in pending:
                ray.cancel(ref, force=True)
            raise_if_stopped()
            return
        for ref in done:
            job = pending.pop(ref)
            try:
                outcome = RetrainOutcome(job, ray.get(ref), attempts=attempts[job.key])
            except ray.exceptions.RayError as err:
                failure = describe_failure(err)
                deterministic = history.record(job.key, failure)
                if not deterministic and attempts[job.key] <= max_retries:
                    logger.warning("retrain %s failed (%s); retry %d of %d from its last checkpoint",
                                   job.key, failure.message, attempts[job.key], max_retries)
                    pending[submit(job)] = job
                    continue
                reason = "failed twice with the same error" if deterministic else f"failed after {max_retries} retries"
                logger.error("retrain %s %s: %s", job.key, reason, failure.message)
                outcome = RetrainOutcome(job, None, failure.message, attempts=attempts[job.key],
                                         deterministic=deterministic)
            if on_done is not None:
                on_done(outcome)
            yield outcome


def checkpoint_directory(storage_path: str, cell_key: str, eta: float, seed: int,
                         hyperparameters: dict[str, Any] | None = None) -> str | None:
    """Return where a retrain saves its epochs, or None when storage is not a filesystem.

    With ``hyperparameters`` the directory name includes a short hash of them, so a
    checkpoint is never continued with another winner's configuration.

    NOTE: with a cloud storage URI (s3://, gs://) retrains keep no checkpoint and a retried
    task starts again from its first epoch.
    """
    if "://" in storage_path and not storage_path.startswith("file://"):
        return None
    root = Path(storage_path.removeprefix("file://"))
    name = f"eta{eta:g}-seed{seed}"
    if hyperparameters is not None:
        digest = hashlib.sha256(json.dumps(hyperparameters, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{name}-{digest}"
    return str(root / "retrain" / cell_key / name)
