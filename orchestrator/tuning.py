"""Tune one cell (dataset x model x loss): build and run the Ray Tune ``Tuner``.

Trials run ``trainables.train.tune_trial`` with the cell's data taken from Ray's object
store. A driver-side callback records every epoch of every trial to MLflow through the
``Tracker`` and keeps the learning curves that winner selection needs.

Failures: Ray Tune's ``FailureConfig`` restarts a failed trial from its last epoch
checkpoint up to ``max_failures`` times, whether its code raised or its worker process or
node died. A trial whose code raises the same error twice in a row is not retried again
(see ``TrialRecorder.on_trial_recover``). It ends with status ``error``, and its MLflow
run is FAILED with the error in the ``error`` tag. Selection ignores such trials.

Resuming: ``tune_cell`` takes the trials an interrupted run finished (read back from
MLflow by the study) as ``previous`` and runs only the rest of ``num_samples``. The
searcher is warm-started where it can learn from them (see ``WARM_STARTS``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The service prints its own progress; keep Ray Tune's tables and snapshot hints quiet.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# The service handles SIGINT itself (orchestrator.reliability.StopSignals); Ray Tune's own
# handler would end the Tuner quietly and report trials as finished.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

from ray import tune  # noqa: E402

from orchestrator.errors import RunFailedError  # noqa: E402
from orchestrator.reliability import (  # noqa: E402
    ABORT_KEY,
    MAX_ERROR_LENGTH,
    Failure,
    FailureHistory,
    describe_failure,
    guard_trial,
    raise_if_stopped,
    stop_requested,
)
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

# Tags of a trial run that a resumed study reads back.
TRIAL_CONFIG_TAG = "trial_config"
TRIAL_STATUS_TAG = "trial_status"


@dataclass(frozen=True)
class TuningSettings:
    """Tuning settings of one cell, taken from the study file."""

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
    """Trials of one cell, the winner, and how the search went.

    ``records`` lists the reused trials of an interrupted run first (``reused`` of them),
    then the trials of this run. ``retries`` counts restarts after a failure per trial id.
    ``errors`` maps every trial that ended in error to its error message.
    """

    records: list[TrialRecord]
    selection: Selection
    health: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    reused: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class TrialRecorder(tune.Callback):
    """Tune callback on the driver: one MLflow run per trial, one metric row per epoch.

    A run is created at a trial's first result (or its final error), never at its start,
    so a trial that Hyperband pauses and resumes keeps one run. Learning curves are kept
    in memory for winner selection. The run's ``trial_config`` tag contains the config as
    JSON and ``trial_status`` the outcome (finished, stopped or error). A resumed study
    reads both back. Retries are logged as the ``retries`` and ``last_error``
    tags.
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
        self.retries: dict[str, int] = {}
        self.last_errors: dict[str, str] = {}
        self.failures = FailureHistory()

    def _run_id(self, trial) -> str:
        trial_id = trial.trial_id
        if trial_id not in self.run_ids:
            config = {key: value for key, value in plain(dict(trial.config)).items() if key != ABORT_KEY}
            tags = {**self.cell_tags, "phase": PHASE_TUNE, "trial_id": trial_id,
                    TRIAL_CONFIG_TAG: json.dumps(config, sort_keys=True)}
            run_id = self.tracker.start_run(f"trial-{trial_id}", tags, parent_id=self.cell_run_id)
            self.tracker.log_params(run_id, config)
            self.run_ids[trial_id] = run_id
            self.configs[trial_id] = config
            self.curves[trial_id] = {}
            if trial_id in self.last_errors:
                self.tracker.set_tags(run_id, {"retries": self.retries.get(trial_id, 0),
                                               "last_error": self.last_errors[trial_id]})
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
        self.tracker.set_tags(run_id, {TRIAL_STATUS_TAG: status})
        self.tracker.end_run(run_id, mlflow_status)
        if self.on_trial_done is not None:
            self.on_trial_done(len(self.statuses))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if stop_requested() is not None or self.tracker.outage_exceeded():
            # Ray Tune ends the running trials when the study stops for a stop signal or a
            # tracking outage. They did not finish, so a resumed study runs them again.
            return
        self._finish(trial, "finished", "FINISHED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        """Log a failed attempt; stop retrying a trial whose error repeats.

        Ray Tune has already queued the next attempt when this runs. For a repeated
        error the trial's failure budget is cut to the failures so far and ``ABORT_KEY``
        is added to its config, so the queued attempt raises at once (see
        ``guard_trial``) and the trial ends in error without training again.
        """
        failure = trial_failure(trial)
        trial_id = trial.trial_id
        self.last_errors[trial_id] = failure.message[:MAX_ERROR_LENGTH]
        if self.failures.record(trial_id, failure):
            logger.error("trial %s failed twice with the same error, not retrying it: %s",
                         trial_id, failure.message)
            trial.config[ABORT_KEY] = failure.message
            trial.max_failures = trial.run_metadata.num_failures
        else:
            self.retries[trial_id] = self.retries.get(trial_id, 0) + 1
            logger.warning("trial %s failed (%s); retry %d of %d from its last checkpoint",
                           trial_id, failure.message, self.retries[trial_id], trial.max_failures)
        if trial_id in self.run_ids:
            self.tracker.set_tags(self.run_ids[trial_id], {
                "retries": self.retries.get(trial_id, 0), "last_error": self.last_errors[trial_id],
            })

    def on_trial_error(self, iteration, trials, trial, **info):
        trial_id = trial.trial_id
        if ABORT_KEY in trial.config:
            message = str(trial.config[ABORT_KEY])
        else:
            message = trial_failure(trial).message
        self.errors[trial_id] = message
        logger.error("trial %s failed after %d retries: %s", trial_id, self.retries.get(trial_id, 0), message)
        run_id = self._run_id(trial)
        self.tracker.set_tags(run_id, {"error": message[:MAX_ERROR_LENGTH],
                                       "retries": self.retries.get(trial_id, 0)})
        self._finish(trial, "error", "FAILED")

    def close_open_runs(self, status: str) -> int:
        """End the runs of trials that have not ended (interrupted ones) with ``status``."""
        open_ids = [trial_id for trial_id in self.run_ids if trial_id not in self.statuses]
        for trial_id in open_ids:
            self.tracker.set_tags(self.run_ids[trial_id], {"interrupted": "true"})
            self.tracker.end_run(self.run_ids[trial_id], status)
        return len(open_ids)

    def records(self) -> list[TrialRecord]:
        """Return one ``TrialRecord`` per trial that ended, in the order they first reported."""
        return [
            TrialRecord(
                trial_id=trial_id,
                config=self.configs[trial_id],
                values=dict(self.curves[trial_id]),
                status=self.statuses[trial_id],
                diverged=self.diverged.get(trial_id, False),
            )
            for trial_id in self.run_ids
            if trial_id in self.statuses
        ]


def trial_failure(trial) -> Failure:
    """Return the latest failure of a Ray Tune trial, read from its local error files."""
    path = getattr(trial, "pickled_error_file", None)
    if path and os.path.exists(path):
        import cloudpickle

        try:
            with open(path, "rb") as handle:
                return describe_failure(cloudpickle.load(handle))
        except Exception as err:  # an unpicklable error class must not break the callback
            logger.debug("cannot read the pickled error of trial %s: %s", trial.trial_id, err)
    text_path = getattr(trial, "error_file", None)
    if text_path and os.path.exists(text_path):
        blocks = Path(text_path).read_text(errors="replace").split("Failure # ")
        return describe_failure(RuntimeError(blocks[-1].split("\n", 1)[-1]))
    return describe_failure(None)


class StudyStopper(tune.Stopper):
    """Stop the whole Tuner on a stop signal or a tracking outage past its limit."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return stop_requested() is not None or bool(self.tracker.outage_exceeded())


# --- Warm start of a resumed cell ---------------------------------------------------------


@dataclass(frozen=True)
class WarmStart:
    """Warm-start rule of a preset: its searcher continuing from an interrupted run's trials.

    ``replay`` True: the finished configurations are queued as points to evaluate and
    each is suggested and completed with its last value at once, so the searcher's model
    contains them before the first new trial. Every preset gets a new seed derived from
    the number of finished trials, so its random draws do not repeat theirs.
    """

    replay: bool
    description: str


WARM_STARTS: dict[str, WarmStart] = {
    "skopt": WarmStart(True, "finished trials' points and values are told to the Gaussian process"),
    "random": WarmStart(False, "random search learns nothing from results; it draws with a new seed"),
    # NOTE: hpbandster's BOHB does not restore reliably under Ray Tune, because its kernel
    # density model and Hyperband brackets are tied to the trials of one Tuner. A resumed
    # BOHB search starts afresh with a new seed. The finished trials still count for selection.
    "bohb": WarmStart(False, "BOHB restarts with a new seed; finished trials count for selection only"),
}


def resumed_seed(seed: int, finished: int) -> int:
    """Return the searcher seed of a cell resumed with ``finished`` trials (``seed`` for 0)."""
    return (seed + 1_000_003 * finished) % 2**31


def replay_into_searcher(searcher: Any, records: Sequence[TrialRecord], metric: str) -> int:
    """Suggest and complete each record's config (queued as points to evaluate) at once.

    Returns how many were replayed. Raises RunFailedError when the searcher does not
    return the queued points in order, which means it was built without them.
    """
    for record in records:
        trial_id = f"resumed_{record.trial_id}"
        config = searcher.suggest(trial_id)
        if config is None or any(config.get(name) != value for name, value in record.config.items()):
            raise RunFailedError(
                f"searcher {type(searcher).__name__} suggested {config} instead of the finished trial "
                f"{record.trial_id} {record.config}; start the cell afresh under a new study name"
            )
        last_value = record.values[max(record.values)]
        searcher.on_trial_complete(trial_id, {metric: last_value})
    return len(records)


# --- One cell -----------------------------------------------------------------------------


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
    previous: Sequence[TrialRecord] = (),
) -> TuningOutcome:
    """Tune the hyperparameters of one cell and select its winner at a common budget.

    ``setup.epochs`` must equal ``settings.max_epochs`` (the Hyperband budget).
    ``trial_function`` takes ``(config, setup, data)``; benchmarks and tests replace the
    training. ``previous`` are trials an interrupted run of this cell finished. Only
    ``num_samples - len(previous)`` new trials run, and selection compares old and new.
    Raises RunFailedError when no trial produced a result, TrackingUnavailableError when
    the tracking store stayed away past the outage limit, and re-raises a stop signal
    after marking the runs of unfinished trials KILLED.
    """
    started = time.perf_counter()
    previous = list(previous)
    remaining = settings.num_samples - len(previous)
    recorder = TrialRecorder(tracker, cell_run_id, cell_tags, settings.metric,
                             settings.max_epochs, on_trial_done)
    health: dict[str, int] = {}
    if remaining > 0:
        health = _run_tuner(label, setup, data, space, settings, tracker, storage_path, trial_function,
                            previous, remaining, recorder)
    else:
        logger.info("cell %s: all %d trials finished in an earlier run; selecting from them",
                    label, len(previous))

    records = previous + recorder.records()
    selection = select_winner(
        records, mode=settings.mode, min_trials=settings.min_trials_at_budget, label=label
    )
    return TuningOutcome(records, selection, health, time.perf_counter() - started, reused=len(previous),
                         retries=dict(recorder.retries), errors=dict(recorder.errors))


def _run_tuner(label: str, setup: TrainingSetup, data: DataBundle, space: SearchSpace,
               settings: TuningSettings, tracker: Tracker, storage_path: str,
               trial_function: Callable[..., None], previous: list[TrialRecord], remaining: int,
               recorder: TrialRecorder) -> dict[str, int]:
    """Run ``remaining`` new trials and return the search health counters."""
    # Searcher and scheduler, warm-started from the trials an interrupted run finished.
    warm_start = WARM_STARTS.get(settings.preset, WarmStart(False, "no warm start"))
    replayed = [record for record in previous if warm_start.replay and record.status != "error" and record.values]
    plan = build_search(
        settings.preset,
        space,
        metric=settings.metric,
        mode=settings.mode,
        max_t=settings.max_epochs,
        reduction_factor=settings.reduction_factor,
        num_samples=settings.num_samples,
        seed=resumed_seed(settings.seed, len(previous)),
        max_concurrent=settings.max_concurrent or 0,
        scheduler=settings.scheduler,
        points_to_evaluate=[record.config for record in replayed] or None,
    )
    if previous:
        replay_into_searcher(plan.search_alg, replayed, settings.metric)
        logger.info("cell %s: resuming with %d finished trials and %d to run; %s", label, len(previous),
                    remaining, warm_start.description)

    # The Tuner; a resumed cell writes to a new experiment directory beside the old one.
    trainable = tune.with_resources(
        tune.with_parameters(guard_trial(trial_function), setup=setup, data=data),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    name = label if not previous else f"{label}-resumed-{time.strftime('%Y%m%d-%H%M%S')}"
    tuner = tune.Tuner(
        trainable,
        param_space=getattr(plan, "param_space", None) or {},
        tune_config=tune.TuneConfig(
            search_alg=plan.search_alg,
            scheduler=plan.scheduler,
            num_samples=remaining,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=[recorder],
            stop=StudyStopper(tracker),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )
    try:
        tuner.fit()
    except BaseException:
        recorder.close_open_runs("KILLED")
        raise
    if stop_requested() is not None or tracker.outage_exceeded():
        recorder.close_open_runs("KILLED")
        raise_if_stopped()
        tracker.check_available()
    return search_health(plan.search_alg)


def storage_uri(path: str) -> str:
    """Return ``path`` as Ray Tune's ``storage_path``: URIs unchanged, local paths absolute."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())
