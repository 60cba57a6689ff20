"""Tune one cell (dataset x model x loss): build and run the Ray Tune ``Tuner``.

Trials run ``trainables.train.tune_trial`` with the cell's data taken from Ray's object
store. A driver-side callback records every epoch of every trial to MLflow through the
``Tracker`` and keeps the learning curves that winner selection needs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The service prints its own progress; keep Ray Tune's tables and snapshot hints quiet.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from ray import tune  # noqa: E402

from orchestrator.searchers import build_search, search_health  # noqa: E402
from orchestrator.selection import Selection, TrialRecord, select_winner  # noqa: E402
from orchestrator.tracking import PHASE_TUNE, Tracker, plain  # noqa: E402
from search_spaces import SearchSpace  # noqa: E402
from trainables.train import DataBundle, TrainingSetup, tune_trial  # noqa: E402

logger = logging.getLogger(__name__)

TRIAL_METRICS = (
    "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate",
    "epoch_seconds", "samples_per_second", "diverged",
)


@dataclass(frozen=True)
class TuningSettings:
    """What the study file says about tuning one cell."""

    preset: str
    scheduler: str | None
    num_samples: int
    max_epochs: int
    reduction_factor: int
    seed: int
    max_concurrent: int | None
    metric: str
    mode: str
    min_trials_at_budget: int
    cpus_per_trial: float
    gpus_per_trial: float
    max_failures: int


@dataclass
class TuningOutcome:
    """Trials of one cell, the winner, and how the search went."""

    records: list[TrialRecord]
    selection: Selection
    health: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class TrialRecorder(tune.Callback):
    """Tune callback on the driver: one MLflow run per trial, one metric row per epoch.

    A run is created at a trial's first result, never at its start, so a trial that
    Hyperband pauses and resumes keeps one run. Learning curves are kept in memory for
    winner selection.
    """

    def __init__(self, tracker: Tracker, cell_run_id: str, cell_tags: Mapping[str, str],
                 metric: str, max_epochs: int, on_trial_done: Callable[[int], None] | None = None):
        self.tracker = tracker
        self.cell_run_id = cell_run_id
        self.cell_tags = dict(cell_tags)
        self.metric = metric
        self.max_epochs = max_epochs
        self.on_trial_done = on_trial_done
        self.run_ids: dict[str, str] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.curves: dict[str, dict[int, float]] = {}
        self.diverged: dict[str, bool] = {}
        self.statuses: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def _run_id(self, trial) -> str:
        trial_id = trial.trial_id
        if trial_id not in self.run_ids:
            config = plain(dict(trial.config))
            tags = {**self.cell_tags, "phase": PHASE_TUNE, "trial_id": trial_id}
            run_id = self.tracker.start_run(f"trial-{trial_id}", tags, parent_id=self.cell_run_id)
            self.tracker.log_params(run_id, config)
            self.run_ids[trial_id] = run_id
            self.configs[trial_id] = config
            self.curves[trial_id] = {}
        return self.run_ids[trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_id(trial)
        epoch = int(result.get("epoch", result["training_iteration"]))
        self.curves[trial.trial_id][epoch] = float(result.get(self.metric, math.nan))
        self.diverged[trial.trial_id] = bool(result.get("diverged", False))
        self.tracker.log_metrics(run_id, {key: result.get(key) for key in TRIAL_METRICS}, step=epoch)

    def _finish(self, trial, status: str, mlflow_status: str) -> None:
        run_id = self._run_id(trial)
        budget = max(self.curves[trial.trial_id], default=0)
        if status == "finished" and budget < self.max_epochs and not self.diverged.get(trial.trial_id):
            status = "stopped"
        self.statuses[trial.trial_id] = status
        self.tracker.log_metrics(run_id, {"budget": budget}, step=budget)
        self.tracker.set_tags(run_id, {"trial_status": status})
        self.tracker.end_run(run_id, mlflow_status)
        if self.on_trial_done is not None:
            self.on_trial_done(len(self.statuses))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "finished", "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = getattr(trial, "error_file", None) or "unknown error"
        self.errors[trial.trial_id] = str(error)
        logger.warning("trial %s failed after its retries (see %s)", trial.trial_id, error)
        self._finish(trial, "error", "FAILED")

    def records(self) -> list[TrialRecord]:
        """Return one ``TrialRecord`` per trial seen, in the order they first reported."""
        return [
            TrialRecord(
                trial_id=trial_id,
                config=self.configs[trial_id],
                values=dict(self.curves[trial_id]),
                status=self.statuses.get(trial_id, "error"),
                diverged=self.diverged.get(trial_id, False),
            )
            for trial_id in self.run_ids
        ]


def tune_cell(
    label: str,
    setup: TrainingSetup,
    data: DataBundle,
    space: SearchSpace,
    settings: TuningSettings,
    tracker: Tracker,
    cell_run_id: str,
    cell_tags: Mapping[str, str],
    storage_path: str,
    on_trial_done: Callable[[int], None] | None = None,
    trial_function: Callable[..., None] = tune_trial,
) -> TuningOutcome:
    """Tune the hyperparameters of one cell and select its winner at a common budget.

    ``setup.epochs`` must equal ``settings.max_epochs`` (the Hyperband budget).
    ``trial_function`` takes ``(config, setup, data)``; benchmarks replace the training.
    Raises RunFailedError when no trial produced a result.
    """
    started = time.perf_counter()
    plan = build_search(
        settings.preset,
        space,
        metric=settings.metric,
        mode=settings.mode,
        max_t=settings.max_epochs,
        reduction_factor=settings.reduction_factor,
        num_samples=settings.num_samples,
        seed=settings.seed,
        max_concurrent=settings.max_concurrent or 0,
        scheduler=settings.scheduler,
    )
    recorder = TrialRecorder(tracker, cell_run_id, cell_tags, settings.metric,
                             settings.max_epochs, on_trial_done)
    trainable = tune.with_resources(
        tune.with_parameters(trial_function, setup=setup, data=data),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=getattr(plan, "param_space", None) or {},
        tune_config=tune.TuneConfig(
            search_alg=plan.search_alg,
            scheduler=plan.scheduler,
            num_samples=settings.num_samples,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=label,
            storage_path=storage_path,
            callbacks=[recorder],
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )
    tuner.fit()

    health = search_health(plan.search_alg)
    records = recorder.records()
    selection = select_winner(
        records, mode=settings.mode, min_trials=settings.min_trials_at_budget, label=label
    )
    return TuningOutcome(records, selection, health, time.perf_counter() - started)


def storage_uri(path: str) -> str:
    """Return ``path`` as Ray Tune's ``storage_path``: URIs unchanged, local paths absolute."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())
