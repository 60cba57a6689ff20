"""The study pipeline behind ``hpo run``: preflight, tune, select, retrain, export.

    study.yaml -> StudySpec -> preflight -> Ray
      for each cell (dataset x model x loss):
        data prepared once on the driver -> Ray object store
        Tuner(trial function, searcher, scheduler) -> tracking callback (driver)
        winner at a common budget
        retrain tasks (eta x seeds) -> tracking (driver)
      export Table 2 from MLflow -> artifacts of the study run

Phases are idempotent when a study is resumed: a FINISHED cell run is skipped, a cell whose
tuning finished keeps its winner, and a FINISHED retrain run is not redone. Runs left
RUNNING by a crash are marked FAILED and their work is redone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import SpecError
from orchestrator.export import export_study
from orchestrator.preflight import check_data, check_resources, connect_ray, load_cell_spaces, open_tracking
from orchestrator.retrain import RetrainJob, RetrainOutcome, checkpoint_directory, run_retrains
from orchestrator.spec import Cell, StudySpec
from orchestrator.tracking import PHASE_CELL, PHASE_RETRAIN, PHASE_STUDY, Tracker, plain, write_json
from orchestrator.tuning import TuningSettings, storage_uri, tune_cell
from trainables.data import PreparedData, input_shape, prepare_dataset, stratified_split, stratified_subset
from trainables.train import DataBundle, TrainingSetup

logger = logging.getLogger(__name__)


@dataclass
class CellSummary:
    """How one cell went: trials by status, winner, retrains done and failed."""

    cell: str
    trials: dict[str, int] = field(default_factory=dict)
    winner: dict[str, Any] | None = None
    budget: int | None = None
    retrains_done: int = 0
    retrains_skipped: int = 0
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

    def format(self) -> str:
        lines = [f"study {self.study} finished in {self.seconds / 60:.1f} min"]
        for cell in self.cells:
            if cell.skipped:
                lines.append(f"  {cell.cell}: already finished, skipped")
                continue
            trials = ", ".join(f"{count} {status}" for status, count in sorted(cell.trials.items()))
            lines.append(
                f"  {cell.cell}: trials {trials or 'none (tuning reused)'}; winner at {cell.budget} epochs "
                f"{cell.winner}; retrains {cell.retrains_done} done, {cell.retrains_skipped} reused, "
                f"{len(cell.retrain_failures)} failed"
            )
            for failure in cell.retrain_failures:
                lines.append(f"    could not produce: {failure}")
        lines.append(f"MLflow: {self.tracking_uri} (experiment {self.study}, run {self.study_run_id})")
        for kind, path in sorted(self.exports.items()):
            lines.append(f"{kind}: {path}")
        return "\n".join(lines)


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


def _fail_stale_runs(tracker: Tracker, study_run_id: str) -> int:
    """Mark runs of this study left RUNNING by a crash as FAILED; return how many."""
    stale = [run for run in tracker.find_runs("", statuses=["RUNNING"]) if run.info.run_id != study_run_id]
    for run in stale:
        tracker.end_run(run.info.run_id, "FAILED")
    if stale:
        logger.warning("marked %d runs left RUNNING by an interrupted run as FAILED", len(stale))
    return len(stale)


def _cell_filter(cell: Cell, phase: str) -> str:
    return (f"tags.phase = '{phase}' and tags.dataset = '{cell.dataset}' "
            f"and tags.model = '{cell.model}' and tags.loss = '{cell.loss}'")


# --- Pipeline ----------------------------------------------------------------------------


class StudyRunner:
    """Runs one study from a validated spec; see the module docstring for the steps."""

    def __init__(self, spec: StudySpec, *, resume: bool = False):
        self.spec = spec
        self.resume = resume
        self.directory = Path(spec.study_directory)
        self.storage = storage_uri(spec.resolved_storage_path)
        self._data: dict[tuple[str, tuple[int, int, int]], tuple[CellData, Any, Any]] = {}

    def preflight(self) -> None:
        """Run every check that needs no training; raise an InputError on the first failure."""
        check_data(self.spec)
        self.spaces = load_cell_spaces(self.spec)
        self.tracker = open_tracking(self.spec)
        existing = _find_study_run(self.tracker)
        if existing is not None and not self.resume:
            raise SpecError(
                f"study {self.spec.name} already has runs in experiment {self.spec.experiment_name} "
                f"at {self.spec.resolved_tracking_uri} (run {existing.info.run_id}); "
                f"continue it with 'hpo run {self.spec.source} --resume' or choose another name"
            )
        self.existing_run = existing
        connect_ray(self.spec)
        import ray

        check_resources(self.spec, ray.nodes())

    def run(self) -> StudySummary:
        """Run the whole study and return its summary; preflight must have passed."""
        started = time.monotonic()
        spec = self.spec
        self.directory.mkdir(parents=True, exist_ok=True)

        # The study run: new, or the one an interrupted run left behind.
        if self.existing_run is not None:
            study_run_id = self.existing_run.info.run_id
            self.tracker.client.update_run(study_run_id, status="RUNNING")
            _fail_stale_runs(self.tracker, study_run_id)
            logger.info("resuming study %s (run %s)", spec.name, study_run_id)
        else:
            study_run_id = self.tracker.start_study(spec.to_dict())
            logger.info("study %s started (run %s)", spec.name, study_run_id)
        write_json(self.directory / "study.json", spec.to_dict())
        summary = StudySummary(spec.name, spec.resolved_tracking_uri, study_run_id)

        try:
            cells = spec.cells()
            retrains_per_cell = len(spec.retrain.noise_levels) * len(spec.retrain.seeds)
            progress = Progress(len(cells) * (spec.tuning.num_samples + retrains_per_cell))
            for index, cell in enumerate(cells, start=1):
                logger.info("cell %d/%d %s started", index, len(cells), cell)
                summary.cells.append(self.run_cell(cell, study_run_id, progress))

            # Export Table 2 from what MLflow holds, and attach it to the study run.
            out_dir = self.directory / "export"
            result = export_study(spec.resolved_tracking_uri, spec.experiment_name, spec.name, out_dir,
                                  compare_paper=True)
            self.tracker.log_artifacts(study_run_id, result.paths.values(), "table2")
            summary.exports = {kind: str(path) for kind, path in result.paths.items()}
        except BaseException:
            self.tracker.end_run(study_run_id, "FAILED")
            raise
        self.tracker.end_run(study_run_id, "FINISHED")
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

        # A finished cell is not redone; an unfinished one keeps its winner if tuning ended.
        previous = [run for run in tracker.find_runs(_cell_filter(cell, PHASE_CELL))
                    if run.data.tags.get("mlflow.parentRunId") == study_run_id]
        if previous and previous[-1].info.status == "FINISHED":
            summary.skipped = True
            progress.advance(spec.tuning.num_samples + retrains_per_cell, "cell %s already finished", cell)
            return summary
        reusable = [run for run in previous if "winner_config" in run.data.tags]
        bundles, tuning_ref, retrain_ref = self.cell_data(cell)
        max_epochs = spec.tuning.max_epochs or spec.training.epochs

        if reusable:
            cell_run_id = reusable[-1].info.run_id
            tracker.client.update_run(cell_run_id, status="RUNNING")
            winner = json.loads(reusable[-1].data.tags["winner_config"])
            summary.budget = int(reusable[-1].data.tags.get("selection_budget", 0))
            progress.advance(spec.tuning.num_samples, "cell %s: tuning reused from run %s", cell, cell_run_id)
        else:
            cell_run_id = tracker.start_run(str(cell), {"phase": PHASE_CELL, **cell_tags}, parent_id=study_run_id)
            winner = self.tune(cell, cell_run_id, cell_tags, bundles, max_epochs, summary, progress)
        summary.winner = winner

        # Retrain the winner for every (eta, seed) that has no finished run yet.
        try:
            self.retrain_cell(cell, cell_run_id, cell_tags, winner, bundles, retrain_ref, summary, progress)
        except BaseException:
            tracker.end_run(cell_run_id, "FAILED")
            raise
        tracker.end_run(cell_run_id, "FINISHED" if not summary.retrain_failures else "FAILED")
        return summary

    def tune(self, cell: Cell, cell_run_id: str, cell_tags: dict[str, str], bundles: CellData,
             max_epochs: int, summary: CellSummary, progress: Progress) -> dict[str, Any]:
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

        def trial_done(count: int) -> None:
            progress.advance(1, "cell %s: %d/%d trials finished", cell, count, spec.tuning.num_samples)

        try:
            outcome = tune_cell(label, setup, bundles.tuning, self.spaces[cell.loss], settings,
                                self.tracker, cell_run_id, cell_tags, self.storage, trial_done)
        except BaseException:
            self.tracker.end_run(cell_run_id, "FAILED")
            raise
        for record in outcome.records:
            summary.trials[record.status] = summary.trials.get(record.status, 0) + 1
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
        self.tracker.client.log_dict(cell_run_id, {
            "winner": winner, "budget": selection.budget, "budgets": dict(selection.budgets),
            "ranking": [list(item) for item in selection.ranking], "search_health": outcome.health,
        }, "selection.json")
        logger.info("cell %s: winner %s at %d epochs (%s %.4f); search health %s", cell, winner,
                    selection.budget, spec.tuning.metric, selection.value, outcome.health)
        return winner

    def retrain_cell(self, cell: Cell, cell_run_id: str, cell_tags: dict[str, str], winner: dict[str, Any],
                     bundles: CellData, retrain_ref: Any, summary: CellSummary, progress: Progress) -> None:
        spec = self.spec
        finished = {
            (float(run.data.tags["eta"]), int(run.data.tags["seed"]))
            for run in self.tracker.find_runs(_cell_filter(cell, PHASE_RETRAIN), statuses=["FINISHED"])
            if run.data.tags.get("mlflow.parentRunId") == cell_run_id
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
                    checkpoint_dir=checkpoint_directory(self.storage, cell_key, float(eta), int(seed)),
                ))

        def record(outcome: RetrainOutcome) -> None:
            job = outcome.job
            if outcome.result is None:
                summary.retrain_failures.append(f"{job.key}: {outcome.error}")
                failed = self.tracker.start_run(
                    f"retrain-eta{job.eta:g}-seed{job.seed}",
                    {**cell_tags, "phase": PHASE_RETRAIN, "eta": repr(job.eta), "seed": str(job.seed),
                     "error": (outcome.error or "")[:4000]},
                    parent_id=cell_run_id,
                )
                self.tracker.end_run(failed, "FAILED")
            else:
                self.tracker.log_retrain(cell_run_id, cell_tags, job.eta, job.seed, winner, outcome.result)
                summary.retrains_done += 1
            progress.advance(1, "cell %s: retrain eta=%g seed=%d %s (test accuracy %s)", cell, job.eta, job.seed,
                             "done" if outcome.result else "failed",
                             f"{outcome.result['test_accuracy']:.4f}" if outcome.result else "n/a")

        for _ in run_retrains(jobs, retrain_ref, cpus=spec.resources.cpus_per_trial,
                              gpus=spec.resources.gpus_per_trial, max_retries=spec.retries.max_failures,
                              on_done=record):
            pass


def run_study(spec: StudySpec, *, resume: bool = False) -> StudySummary:
    """Check, run and export a study; return its summary. Raises InputError before any work."""
    runner = StudyRunner(spec, resume=resume)
    runner.preflight()
    return runner.run()
