"""Contract test: every search preset runs a real local Ray Tune experiment.

The trainable is a cheap synthetic learning curve (no neural network) that reports once
per epoch, checkpoints its epoch each time and resumes from ``tune.get_checkpoint()``,
as the real trial function does. Hyperband pauses, resumes and stops these trials.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cloudpickle
import pytest
import ray
from ray import tune

from orchestrator.searchers import PRESETS, build_search, search_health
from search_spaces import load_space

MAX_T = 9
REDUCTION_FACTOR = 3
NUM_SAMPLES = 12
MULTIPLIER_QUALITY = {0.01: 0.9, 0.1: 1.0, 0.5: 0.95}

pytestmark = pytest.mark.slow


def learning_curve(config: dict, epoch: int) -> float:
    """Validation accuracy after ``epoch`` epochs: rises to a ceiling set by the config."""
    ceiling = (
        math.exp(-((math.log10(config["learning_rate"]) + 1.5) ** 2) / 2.0)
        * MULTIPLIER_QUALITY[config["lr_multiplier"]]
        * (1.0 - abs(config["smoothing_alpha"] - 0.1))
    )
    speed = 0.15 + 2.0 * config["learning_rate"]
    return ceiling * (1.0 - math.exp(-speed * epoch))


def curve_trainable(config: dict) -> None:
    # Resume from the last checkpoint, if Hyperband paused this trial
    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_epoch = json.loads((Path(folder) / "state.json").read_text())["epoch"]

    # One report and one checkpoint per epoch
    for epoch in range(start_epoch + 1, MAX_T + 1):
        time.sleep(0.005)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps({"epoch": epoch}))
            metrics = {"score": learning_curve(config, epoch), "epoch": epoch, "resumed_from": start_epoch}
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class ResultRecorder(tune.Callback):
    """Driver-side record of every result of every trial, in arrival order."""

    def __init__(self) -> None:
        self.results: dict[str, list[dict]] = defaultdict(list)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        keys = ("training_iteration", "epoch", "resumed_from", "score")
        self.results[trial.trial_id].append({key: result[key] for key in keys})


@pytest.fixture(scope="module")
def local_ray():
    # Ship the trainable by value, so trial workers need not import this module's
    # dependencies (skopt, hpbandster, ...) each time they start.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_runs_real_tune_experiment(local_ray, tmp_path, preset):
    # Run
    space = load_space("table1").restrict({"loss": "ls"})
    plan = build_search(
        preset,
        space,
        metric="score",
        mode="max",
        max_t=MAX_T,
        reduction_factor=REDUCTION_FACTOR,
        num_samples=NUM_SAMPLES,
        seed=0,
        max_concurrent=2,
    )
    recorder = ResultRecorder()
    tuner = tune.Tuner(
        curve_trainable,
        tune_config=tune.TuneConfig(
            search_alg=plan.search_alg, scheduler=plan.scheduler, num_samples=NUM_SAMPLES, reuse_actors=True
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name=preset, verbose=0, callbacks=[recorder]),
    )
    grid = tuner.fit()

    # Every trial ran without errors and reported once per epoch
    assert grid.num_errors == 0
    assert len(grid) == NUM_SAMPLES
    assert len(recorder.results) == NUM_SAMPLES
    for trial_id, results in recorder.results.items():
        iterations = [result["training_iteration"] for result in results]
        assert iterations == list(range(1, len(iterations) + 1)), f"trial {trial_id}: {iterations}"
        assert [result["epoch"] for result in results] == iterations, f"trial {trial_id}: {results}"

    # Hyperband or ASHA stopped some trials before max_t
    budgets = {trial_id: results[-1]["training_iteration"] for trial_id, results in recorder.results.items()}
    assert max(budgets.values()) == MAX_T
    assert min(budgets.values()) < MAX_T

    # A paused trial resumed from the checkpoint of its last reported epoch
    resumed = 0
    for trial_id, results in recorder.results.items():
        for previous, current in zip(results, results[1:]):
            if current["resumed_from"] != previous["resumed_from"]:
                assert current["resumed_from"] == previous["epoch"], f"trial {trial_id}: {results}"
                resumed += 1
    if preset in ("bohb", "skopt"):
        assert resumed > 0

    # The best configuration at the full budget comes back as plain values in the space
    full_budget = [result for result in grid if result.metrics["training_iteration"] == MAX_T]
    best = max(full_budget, key=lambda result: result.metrics["score"])
    best_recorded = max(results[-1]["score"] for results in recorder.results.values() if len(results) == MAX_T)
    assert best.metrics["score"] == best_recorded
    assert set(best.config) == set(space.names)
    for parameter in space.parameters:
        assert type(best.config[parameter.name]) is float
        assert parameter.contains(best.config[parameter.name])

    # Health counters agree with the run
    health = search_health(plan.search_alg)
    assert health["suggested"] == NUM_SAMPLES
    if preset == "skopt":
        assert health["told"] == NUM_SAMPLES
        assert health["skipped"] == 0
        # HyperBandForBOHB reported its pauses to the searcher.
        assert health["pauses"] > 0
    if preset == "bohb":
        assert health["results"] > 0
    if preset == "random":
        assert health["completed"] == NUM_SAMPLES
        assert health["pauses"] == 0
