"""The study pipeline behind ``hpo run``: preflight, tune, select, retrain, export.

    study.yaml -> StudySpec -> preflight -> Ray
      for each cell (dataset x model x loss):
        data prepared once on the driver -> Ray object store
        Tuner(trial function, searcher, scheduler) -> tracking callback (driver)
        winner at a common budget
        retrain tasks (eta x seeds) -> tracking (driver)
      export Table 2 from MLflow -> artifacts of the study run

Phases are idempotent when a study is resumed. A FINISHED cell run is skipped, and a cell
whose tuning finished keeps its winner. A cell interrupted while tuning keeps the trials
that finished and runs only the rest. A FINISHED retrain run is not redone. Runs left
RUNNING by a crash are reconciled (see ``reconcile_stale_runs``) and their work is redone;
retrains continue from their epoch checkpoints.

A stop signal (``StudyInterrupted``) marks the runs in progress KILLED; a tracking outage
past its limit (``TrackingUnavailableError``) stops the study with the undelivered writes
kept in the study directory's journal. In both cases the Ray instance the study started is
shut down, and ``--resume`` continues the study.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import SpecError, TrackingError
from orchestrator.export import export_study
from orchestrator.preflight import check_data, check_resources, connect_ray, load_cell_spaces, open_tracking
from orchestrator.reliability import (
    StudyInterrupted,
    TrackingUnavailableError,
    interruptible_sleep,
    is_transient_tracking_error,
    raise_if_stopped,
    reinstall_stop_handlers,
    stop_requested,
)
from orchestrator.retrain import RetrainJob, RetrainOutcome, checkpoint_directory, run_retrains
from orchestrator.selection import TRIAL_STATUSES, TrialRecord
from orchestrator.spec import Cell, StudySpec
from orchestrator.submit import submitted_job_id
from orchestrator.tracking import PHASE_CELL, PHASE_RETRAIN, PHASE_STUDY, PHASE_TUNE, Tracker, plain, write_json
from orchestrator.tuning import TRIAL_CONFIG_TAG, TRIAL_STATUS_TAG, TuningSettings, storage_uri, tune_cell
from trainables.data import PreparedData, input_shape, prepare_dataset, stratified_split, stratified_subset
from trainables.train import DataBundle, TrainingSetup, retrain, tune_trial

logger = logging.getLogger(__name__)

# File in the study directory that keeps MLflow writes while the store is unreachable.
JOURNAL_FILE = "tracking-journal.jsonl"
INTERRUPTED = "interrupted: the study stopped before this run ended"


@dataclass
class CellSummary:
    """Outcome of one cell: trials by status, retries, winner, retrains done and failed.

    ``trials`` counts every trial the cell's selection saw, ``trials_reused`` of them
    finished in an interrupted earlier run. ``trials_retried`` trials were restarted after
    a failure (``trial_retries`` restarts in all); ``trial_errors`` and
    ``retrain_failures`` list what could not be produced, with the error.
    """

    cell: str
    trials: dict[str, int] = field(default_factory=dict)
    trials_reused: int = 0
    trials_retried: int = 0
    trial_retries: int = 0
    trial_errors: list[str] = field(default_factory=list)
    winner: dict[str, Any] | None = None
    budget: int | None = None
    retrains_done: int = 0
    retrains_skipped: int = 0
    retrains_retried: int = 0
    retrain_failures: list[str] = field(default_factory=list)
    skipped: bool = False


@dataclass
class StudySummary:
    """The outcome of a study run, printed at its end."""

    study: str
    tracking_uri: str
    study_run_id: str
    cells: list[CellSummary] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    dropped_writes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"study {self.study} finished in {self.seconds / 60:.1f} min"]
        for cell in self.cells:
            if cell.skipped:
                lines.append(f"  {cell.cell}: already finished, skipped")
                continue
            lines.extend(self._format_cell(cell))
        totals = self.totals()
        lines.append(
            "  total: trials {finished} finished, {stopped} stopped early, {error} failed, "
            "{retried} retried; retrains {retrains_done} done, {retrains_skipped} reused, "
            "{retrains_failed} failed, {retrains_retried} retried".format(**totals)
        )
        for write in self.dropped_writes:
            lines.append(f"  could not be recorded: {write}")
        lines.append(f"MLflow: {self.tracking_uri} (experiment {self.study}, run {self.study_run_id})")
        for kind, path in sorted(self.exports.items()):
            lines.append(f"{kind}: {path}")
        return "\n".join(lines)

    @staticmethod
    def _format_cell(cell: CellSummary) -> list[str]:
        trials = ", ".join(f"{count} {status}" for status, count in sorted(cell.trials.items()))
        reused = f" ({cell.trials_reused} from the interrupted run)" if cell.trials_reused else ""
        lines = [
            f"  {cell.cell}: trials {trials or 'none (tuning reused)'}{reused}, {cell.trials_retried} retried; "
            f"winner at {cell.budget} epochs {cell.winner}; retrains {cell.retrains_done} done, "
            f"{cell.retrains_skipped} reused, {len(cell.retrain_failures)} failed, {cell.retrains_retried} retried"
        ]
        for failure in cell.trial_errors + cell.retrain_failures:
            lines.append(f"    could not produce: {failure}")
        return lines

    def totals(self) -> dict[str, int]:
        """Return counts over all cells: trials by outcome, retried trials, retrains."""
        cells = [cell for cell in self.cells if not cell.skipped]
        return {
            "finished": sum(cell.trials.get("finished", 0) for cell in cells),
            "stopped": sum(cell.trials.get("stopped", 0) for cell in cells),
            "error": sum(cell.trials.get("error", 0) for cell in cells),
            "retried": sum(cell.trials_retried for cell in cells),
            "retrains_done": sum(cell.retrains_done for cell in cells),
            "retrains_skipped": sum(cell.retrains_skipped for cell in cells),
            "retrains_failed": sum(len(cell.retrain_failures) for cell in cells),
            "retrains_retried": sum(cell.retrains_retried for cell in cells),
        }


class Progress:
    """Log lines for long work: what finished, out of how many, and a time estimate."""

    def __init__(self, total_units: float):
        self.total = max(total_units, 1e-9)
        self.done = 0.0
        self.started = time.monotonic()

    def advance(self, units: float, message: str, *args: Any) -> None:
        self.done += units
        elapsed = time.monotonic() - self.started
        remaining = elapsed * (self.total - self.done) / self.done if self.done > 0 else float("nan")
        logger.info(message + " [%.0f%%, %s elapsed, about %s left]", *args,
                    100 * self.done / self.total, _minutes(elapsed), _minutes(remaining))


def _minutes(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# --- Data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellData:
    """The two bundles of a dataset at one input shape: tuning split and full retrain set."""

    tuning: DataBundle
    retrain: DataBundle


def build_cell_data(prepared: PreparedData, validation_fraction: float, subset: int | None, split_seed: int) -> CellData:
    """Cut the tuning split (train/validation) and the retrain set (all training/test)."""
    labels = prepared.train_labels.numpy()
    pool = np.arange(len(labels)) if subset is None else np.sort(stratified_subset(labels, subset, split_seed))
    train_index, validation_index = stratified_split(labels[pool], validation_fraction, split_seed)
    images = prepared.train_images.numpy()
    pool_images = images[pool]
    pool_labels = labels[pool]
    common = {"num_classes": prepared.num_classes, "mean": tuple(prepared.mean), "std": tuple(prepared.std)}
    tuning = DataBundle(
        train_images=pool_images[train_index], train_labels=pool_labels[train_index],
        eval_images=pool_images[validation_index], eval_labels=pool_labels[validation_index], **common,
    )
    retrain = DataBundle(
        train_images=pool_images, train_labels=pool_labels,
        eval_images=prepared.test_images.numpy(), eval_labels=prepared.test_labels.numpy(), **common,
    )
    return CellData(tuning, retrain)


# --- Resume ------------------------------------------------------------------------------


def _find_study_run(tracker: Tracker) -> Any | None:
    runs = tracker.find_runs(f"tags.phase = '{PHASE_STUDY}'")
    return runs[-1] if runs else None


def reconcile_stale_runs(tracker: Tracker, keep_run_id: str | None, status: str = "FAILED",
                         wait: bool = True) -> dict[str, int]:
    """Close the runs of this study left RUNNING, except ``keep_run_id``; return counts by action.

    A resumed study calls this for the runs a crash left behind (``status`` FAILED), a
    stopped study for the runs it was writing (``status`` KILLED).

    - A trial run with a ``trial_status`` tag had ended: it becomes FINISHED (FAILED for
      status error).
    - A retrain run whose final metrics arrived becomes FINISHED. One without them has a
      partial copy of a result that the resumed study logs again in full, so it is
      ended and moved to MLflow's deleted runs (from which MLflow can restore it).
    - Every other run ends with ``status`` and an ``error`` tag; its work is redone.
    """
    counts = {"finished": 0, "ended": 0, "deleted": 0}
    stale = [run for run in tracker.find_runs("", statuses=["RUNNING"], wait=wait)
             if run.info.run_id != keep_run_id]
    for run in stale:
        tags = run.data.tags
        run_id = run.info.run_id
        phase = tags.get("phase")
        if phase == PHASE_TUNE and tags.get(TRIAL_STATUS_TAG) in TRIAL_STATUSES:
            tracker.end_run(run_id, "FAILED" if tags[TRIAL_STATUS_TAG] == "error" else "FINISHED")
            counts["finished"] += 1
        elif phase == PHASE_RETRAIN and "test_accuracy" in run.data.metrics:
            tracker.end_run(run_id, "FINISHED")
            counts["finished"] += 1
        else:
            tracker.set_tags(run_id, {"error": INTERRUPTED})
            tracker.end_run(run_id, status)
            counts["ended"] += 1
            if phase == PHASE_RETRAIN:
                tracker.delete_run(run_id)
                counts["deleted"] += 1
    if stale:
        logger.warning("closed %d runs left RUNNING: %d had finished, %d ended %s "
                       "(%d partial retrain runs deleted)", len(stale), counts["finished"], counts["ended"],
                       status, counts["deleted"])
    return counts


def finished_trials(tracker: Tracker, cell: Cell, cell_run_id: str, metric: str) -> list[TrialRecord]:
    """Read back the trials of a cell run that ended (tag ``trial_status``) as TrialRecords.

    The config comes from the ``trial_config`` tag, the learning curve from the per-epoch
    history of ``metric``. Runs of interrupted trials have no status and are left out.
    """
    records = []
    for run in tracker.find_runs(_cell_filter(cell, PHASE_TUNE)):
        tags = run.data.tags
        if tags.get("mlflow.parentRunId") != cell_run_id or tags.get(TRIAL_STATUS_TAG) not in TRIAL_STATUSES:
            continue
        if TRIAL_CONFIG_TAG in tags:
            config = json.loads(tags[TRIAL_CONFIG_TAG])
        else:
            config = {key: _param_value(value) for key, value in run.data.params.items()}
        records.append(TrialRecord(
            trial_id=tags.get("trial_id", run.info.run_id),
            config=config,
            values=tracker.metric_history(run.info.run_id, metric),
            status=tags[TRIAL_STATUS_TAG],
            diverged=bool(run.data.metrics.get("diverged", 0.0)),
        ))
    return records


def _param_value(text: str) -> Any:
    """Turn a logged param back into a number where it is one."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _cell_filter(cell: Cell, phase: str) -> str:
    return (f"tags.phase = '{phase}' and tags.dataset = '{cell.dataset}' "
            f"and tags.model = '{cell.model}' and tags.loss = '{cell.loss}'")


@contextlib.contextmanager
def ending_run_on_error(tracker: Tracker, run_id: str) -> Iterator[None]:
    """End ``run_id`` KILLED when the block ends after a stop signal, FAILED for other errors."""
    try:
        yield
    except BaseException as err:
        stopped = isinstance(err, StudyInterrupted) or stop_requested() is not None
        tracker.end_run(run_id, "KILLED" if stopped else "FAILED")
        raise


def call_with_tracking_retry(tracker: Tracker, function: Callable[[], Any]) -> Any:
    """Call ``function`` (which reads MLflow), retrying transient store errors like the tracker."""
    started = time.monotonic()
    delay = tracker.policy.first_delay_s
    while True:
        try:
            return function()
        except Exception as err:
            elapsed = time.monotonic() - started
            if not is_transient_tracking_error(err) or elapsed > tracker.policy.limit_s:
                raise
            logger.warning("tracking store read failed (%s); retrying in %.0f s", err, delay)
            interruptible_sleep(delay)
            delay = min(tracker.policy.max_delay_s, delay * 2)


# --- Pipeline ----------------------------------------------------------------------------


def resume_command(study_file: str) -> str:
    """Return the command that continues the study, as its user types it.

    The driver of a submitted job runs on the cluster, but its user resubmits from the
    machine that submitted it, so there the command is ``hpo submit``.
    """
    if submitted_job_id() is not None:
        return f"hpo submit {study_file} --resume"
    return f"hpo run {study_file} --resume"


class StudyRunner:
    """Runs one study from a validated spec; see the module docstring for the steps.

    ``trial_function`` and ``retrain_function`` replace the training of trials and
    retrains (tests inject failures with them); the defaults train for real.
    """

    def __init__(self, spec: StudySpec, *, resume: bool = False,
                 trial_function: Callable[..., None] | None = None,
                 retrain_function: Callable[..., dict[str, Any]] | None = None):
        self.spec = spec
        self.resume = resume
        self.directory = Path(spec.study_directory)
        self.storage = storage_uri(spec.resolved_storage_path)
        self.trial_function = trial_function or tune_trial
        self.retrain_function = retrain_function or retrain
        self.tracker: Tracker | None = None
        self.started_ray = False
        self._data: dict[tuple[str, tuple[int, int, int]], tuple[CellData, Any, Any]] = {}

    def preflight(self) -> None:
        """Run every check that needs no training; raise an InputError on the first failure.

        Tracking writes that an earlier run kept in the journal are delivered here.
        """
        check_data(self.spec)
        self.spaces = load_cell_spaces(self.spec)
        self.tracker = open_tracking(self.spec)
        self.tracker.enable_journal(self.directory / JOURNAL_FILE)
        existing = _find_study_run(self.tracker)
        if existing is not None and not self.resume:
            raise SpecError(
                f"study {self.spec.name} already has runs in experiment {self.spec.experiment_name} "
                f"at {self.spec.resolved_tracking_uri} (run {existing.info.run_id}); "
                f"continue it with '{resume_command(self.spec.source)}' or choose another name"
            )
        self.existing_run = existing
        import ray

        self.started_ray = not ray.is_initialized()
        connect_ray(self.spec)
        # ray.init replaces the SIGTERM handler with one that exits at once.
        reinstall_stop_handlers()
        check_resources(self.spec, ray.nodes())

    def close(self) -> None:
        """Keep undelivered tracking writes in the journal and shut down the Ray it started."""
        if self.tracker is not None:
            self.tracker.close()
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False

    def mark_killed(self) -> None:
        """End every run this study left RUNNING as KILLED after a stop signal.

        Runs the signal caught between their creation and their bookkeeping are found by
        searching the store. When the store does not respond at once this is skipped, and
        a resumed study reconciles those runs.
        """
        if self.tracker is None:
            return
        try:
            reconcile_stale_runs(self.tracker, keep_run_id=None, status="KILLED", wait=False)
        except (TrackingUnavailableError, TrackingError) as err:
            logger.warning("could not mark the runs in progress KILLED (%s); a resumed study closes them", err)

    def resume_hint(self) -> str:
        """Return the commands that continue this study."""
        if submitted_job_id() is not None:
            return f"continue with '{resume_command(self.spec.source)}'"
        return f"continue with '{resume_command(self.spec.source)}' or 'hpo resume {self.directory}'"

    def run(self) -> StudySummary:
        """Run the whole study and return its summary; preflight must have passed."""
        started = time.monotonic()
        spec = self.spec
        tracker = self.tracker
        assert tracker is not None, "preflight() opens the tracker"
        self.directory.mkdir(parents=True, exist_ok=True)

        # The study run: new, or the one an interrupted run left behind.
        if self.existing_run is not None:
            study_run_id = self.existing_run.info.run_id
            tracker.set_status(study_run_id, "RUNNING")
            reconcile_stale_runs(tracker, keep_run_id=study_run_id)
            logger.info("resuming study %s (run %s)", spec.name, study_run_id)
        else:
            study_run_id = tracker.start_study(spec.to_dict())
            logger.info("study %s started (run %s)", spec.name, study_run_id)
        write_json(self.directory / "study.json", spec.to_dict())
        summary = StudySummary(spec.name, spec.resolved_tracking_uri, study_run_id)

        with ending_run_on_error(tracker, study_run_id):
            cells = spec.cells()
            retrains_per_cell = len(spec.retrain.noise_levels) * len(spec.retrain.seeds)
            progress = Progress(len(cells) * (spec.tuning.num_samples + retrains_per_cell))
            for index, cell in enumerate(cells, start=1):
                raise_if_stopped()
                logger.info("cell %d/%d %s started", index, len(cells), cell)
                summary.cells.append(self.run_cell(cell, study_run_id, progress))

            # Export Table 2 from what MLflow holds, and attach it to the study run.
            raise_if_stopped()
            tracker.flush()
            out_dir = self.directory / "export"
            result = call_with_tracking_retry(tracker, lambda: export_study(
                spec.resolved_tracking_uri, spec.experiment_name, spec.name, out_dir, compare_paper=True))
            tracker.log_artifacts(study_run_id, result.paths.values(), "table2")
            summary.exports = {kind: str(path) for kind, path in result.paths.items()}
        tracker.end_run(study_run_id, "FINISHED")
        tracker.flush()
        summary.study_run_id = tracker.run_id(study_run_id)
        summary.dropped_writes = list(tracker.dropped)
        summary.seconds = time.monotonic() - started
        return summary

    def cell_data(self, cell: Cell) -> tuple[CellData, Any, Any]:
        """Return the cell's bundles and their object refs, prepared once per dataset and shape."""
        import ray

        shape = input_shape(cell.dataset, cell.model)
        key = (cell.dataset, tuple(shape))
        if key not in self._data:
            data = self.spec.data
            prepared = prepare_dataset(cell.dataset, data.root, shape, download=data.download)
            bundles = build_cell_data(prepared, data.validation_fraction, data.subset, data.split_seed)
            self._data[key] = (bundles, ray.put(bundles.tuning), ray.put(bundles.retrain))
        return self._data[key]

    def setup_for(self, cell: Cell, epochs: int, num_classes: int) -> TrainingSetup:
        training = self.spec.training
        return TrainingSetup(
            dataset=cell.dataset, model=cell.model, loss=cell.loss, num_classes=num_classes,
            input_shape=tuple(input_shape(cell.dataset, cell.model)), epochs=epochs,
            schedule_epochs=epochs, batch_size=training.batch_size, momentum=training.momentum,
            nesterov=training.nesterov, weight_decay=training.weight_decay,
            lr_decay_every=training.lr_decay_every, model_options=self.spec.options_for(cell.model),
            seed=self.spec.tuning.seed,
        )

    def run_cell(self, cell: Cell, study_run_id: str, progress: Progress) -> CellSummary:
        """Tune, select and retrain one cell, skipping what a previous run finished."""
        spec = self.spec
        tracker = self.tracker
        summary = CellSummary(str(cell))
        cell_tags = {"dataset": cell.dataset, "model": cell.model, "loss": cell.loss}
        retrains_per_cell = len(spec.retrain.noise_levels) * len(spec.retrain.seeds)

        # A finished cell is not redone; an unfinished one keeps its winner or its finished trials.
        # A new study has nothing to reuse, so it reads nothing and keeps going while the
        # tracking store is away.
        previous = []
        if self.existing_run is not None:
            previous = [run for run in tracker.find_runs(_cell_filter(cell, PHASE_CELL))
                        if run.data.tags.get("mlflow.parentRunId") == tracker.run_id(study_run_id)]
        if previous and previous[-1].info.status == "FINISHED":
            summary.skipped = True
            progress.advance(spec.tuning.num_samples + retrains_per_cell, "cell %s already finished", cell)
            return summary
        latest = previous[-1] if previous else None
        bundles, tuning_ref, retrain_ref = self.cell_data(cell)
        max_epochs = spec.tuning.max_epochs or spec.training.epochs

        if latest is not None and "winner_config" in latest.data.tags:
            cell_run_id = latest.info.run_id
            tracker.set_status(cell_run_id, "RUNNING")
            winner = json.loads(latest.data.tags["winner_config"])
            summary.budget = int(latest.data.tags.get("selection_budget", 0))
            progress.advance(spec.tuning.num_samples, "cell %s: tuning reused from run %s", cell, cell_run_id)
        else:
            if latest is not None:
                cell_run_id = latest.info.run_id
                tracker.set_status(cell_run_id, "RUNNING")
                done = finished_trials(tracker, cell, cell_run_id, spec.tuning.metric)
                logger.info("cell %s: continuing tuning in run %s with %d finished trials",
                            cell, cell_run_id, len(done))
            else:
                cell_run_id = tracker.start_run(str(cell), {"phase": PHASE_CELL, **cell_tags},
                                                parent_id=study_run_id)
                done = []
            with ending_run_on_error(tracker, cell_run_id):
                winner = self.tune(cell, cell_run_id, cell_tags, bundles, max_epochs, summary, progress, done)
        summary.winner = winner

        # Retrain the winner for every (eta, seed) that has no finished run yet.
        raise_if_stopped()
        with ending_run_on_error(tracker, cell_run_id):
            self.retrain_cell(cell, cell_run_id, cell_tags, winner, bundles, retrain_ref, summary, progress)
        tracker.end_run(cell_run_id, "FINISHED" if not summary.retrain_failures else "FAILED")
        return summary

    def tune(self, cell: Cell, cell_run_id: str, cell_tags: dict[str, str], bundles: CellData,
             max_epochs: int, summary: CellSummary, progress: Progress,
             previous: list[TrialRecord]) -> dict[str, Any]:
        """Tune one cell, log the selection on its run, and return the winner's config."""
        spec = self.spec
        settings = TuningSettings(
            preset=spec.tuning.search, scheduler=spec.tuning.scheduler,
            num_samples=spec.tuning.num_samples, max_epochs=max_epochs,
            reduction_factor=spec.tuning.reduction_factor, seed=spec.tuning.seed,
            max_concurrent=spec.tuning.max_concurrent, metric=spec.tuning.metric,
            mode=spec.tuning.mode, min_trials_at_budget=spec.tuning.min_trials_at_budget,
            cpus_per_trial=spec.resources.cpus_per_trial, gpus_per_trial=spec.resources.gpus_per_trial,
            max_failures=spec.retries.max_failures,
        )
        setup = self.setup_for(cell, max_epochs, bundles.tuning.num_classes)
        label = f"{cell.dataset}-{cell.model}-{cell.loss}"
        if previous:
            progress.advance(len(previous), "cell %s: %d trials reused from the interrupted run", cell, len(previous))

        def trial_done(count: int) -> None:
            progress.advance(1, "cell %s: %d/%d trials finished", cell, len(previous) + count,
                             spec.tuning.num_samples)

        outcome = tune_cell(label, setup, bundles.tuning, self.spaces[cell.loss], settings,
                            self.tracker, cell_run_id, cell_tags, self.storage, trial_done,
                            trial_function=self.trial_function, previous=previous)
        for record in outcome.records:
            summary.trials[record.status] = summary.trials.get(record.status, 0) + 1
        summary.trials_reused = outcome.reused
        summary.trials_retried = sum(1 for count in outcome.retries.values() if count > 0)
        summary.trial_retries = sum(outcome.retries.values())
        summary.trial_errors = [f"trial {trial_id}: {error}" for trial_id, error in sorted(outcome.errors.items())]
        selection = outcome.selection
        winner = plain(dict(selection.config))
        summary.budget = selection.budget
        self.tracker.log_params(cell_run_id, {f"winner.{key}": value for key, value in winner.items()})
        self.tracker.log_metrics(cell_run_id, {
            "selection_value": selection.value, "selection_budget": selection.budget,
            "tuning_seconds": outcome.seconds, **{f"search_{key}": value for key, value in outcome.health.items()},
        })
        self.tracker.set_tags(cell_run_id, {
            "winner_trial_id": selection.trial_id, "selection_budget": selection.budget,
            "winner_config": json.dumps(winner, sort_keys=True),
        })
        self.tracker.log_dict(cell_run_id, {
            "winner": winner, "budget": selection.budget, "budgets": dict(selection.budgets),
            "ranking": [list(item) for item in selection.ranking], "search_health": outcome.health,
        }, "selection.json")
        logger.info("cell %s: winner %s at %d epochs (%s %.4f); search health %s", cell, winner,
                    selection.budget, spec.tuning.metric, selection.value, outcome.health)
        return winner

    def retrain_cell(self, cell: Cell, cell_run_id: str, cell_tags: dict[str, str], winner: dict[str, Any],
                     bundles: CellData, retrain_ref: Any, summary: CellSummary, progress: Progress) -> None:
        spec = self.spec
        tracker = self.tracker
        finished: set[tuple[float, int]] = set()
        if self.existing_run is not None:
            finished = {
                (float(run.data.tags["eta"]), int(run.data.tags["seed"]))
                for run in tracker.find_runs(_cell_filter(cell, PHASE_RETRAIN), statuses=["FINISHED"])
                if run.data.tags.get("mlflow.parentRunId") == tracker.run_id(cell_run_id)
            }
        setup = self.setup_for(cell, spec.training.epochs, bundles.retrain.num_classes)
        cell_key = f"{cell.dataset}-{cell.model}-{cell.loss}"
        jobs = []
        for eta in spec.retrain.noise_levels:
            for seed in spec.retrain.seeds:
                if (float(eta), int(seed)) in finished:
                    summary.retrains_skipped += 1
                    progress.advance(1, "cell %s: retrain eta=%g seed=%d already finished", cell, eta, seed)
                    continue
                jobs.append(RetrainJob(
                    key=f"{cell} eta={eta:g} seed={seed}", setup=setup, hyperparameters=winner,
                    eta=float(eta), seed=int(seed), noise_seed=spec.retrain.noise_seed,
                    noise_kind=spec.retrain.noise_kind,
                    checkpoint_dir=checkpoint_directory(self.storage, cell_key, float(eta), int(seed), winner),
                ))

        def record(outcome: RetrainOutcome) -> None:
            job = outcome.job
            if outcome.retries:
                summary.retrains_retried += 1
            if outcome.result is None:
                summary.retrain_failures.append(f"{job.key}: {outcome.error}")
                failed = tracker.start_run(
                    f"retrain-eta{job.eta:g}-seed{job.seed}",
                    {**cell_tags, "phase": PHASE_RETRAIN, "eta": repr(job.eta), "seed": str(job.seed),
                     "error": (outcome.error or "")[:4000], "retries": outcome.retries},
                    parent_id=cell_run_id,
                )
                tracker.end_run(failed, "FAILED")
            else:
                extra = {"retries": outcome.retries} if outcome.retries else None
                tracker.log_retrain(cell_run_id, cell_tags, job.eta, job.seed, winner, outcome.result, extra)
                summary.retrains_done += 1
            progress.advance(1, "cell %s: retrain eta=%g seed=%d %s (test accuracy %s)", cell, job.eta, job.seed,
                             "done" if outcome.result else "failed",
                             f"{outcome.result['test_accuracy']:.4f}" if outcome.result else "n/a")

        for _ in run_retrains(jobs, retrain_ref, cpus=spec.resources.cpus_per_trial,
                              gpus=spec.resources.gpus_per_trial, max_retries=spec.retries.max_failures,
                              on_done=record, retrain_function=self.retrain_function,
                              should_stop=tracker.outage_exceeded):
            pass
        tracker.check_available()


def run_study(spec: StudySpec, *, resume: bool = False,
              trial_function: Callable[..., None] | None = None,
              retrain_function: Callable[..., dict[str, Any]] | None = None) -> StudySummary:
    """Check, run and export a study; return its summary. Raises InputError before any work.

    Whatever happens, undelivered tracking writes are kept in the study's journal and a Ray
    instance started here is shut down. A stop signal or a tracking outage past its limit
    is re-raised with the commands that continue the study.
    """
    runner = StudyRunner(spec, resume=resume, trial_function=trial_function, retrain_function=retrain_function)
    try:
        runner.preflight()
        return runner.run()
    except StudyInterrupted as err:
        runner.mark_killed()
        err.hint = runner.resume_hint()
        raise
    except Exception as err:
        signum = stop_requested()
        if signum is not None:
            # Ray may wrap what a stop signal raised in its own errors.
            runner.mark_killed()
            raise StudyInterrupted(signum, runner.resume_hint()) from err
        if isinstance(err, TrackingUnavailableError):
            raise TrackingUnavailableError(f"{err}; {runner.resume_hint()}") from err
        raise
    finally:
        runner.close()
