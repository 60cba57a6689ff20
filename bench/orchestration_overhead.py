"""Orchestration-overhead benchmark: how much wall time Ray Tune and MLflow add to trials.

A cell of ``--trials`` trials runs through ``orchestrator.tuning.tune_cell`` (search preset,
scheduler, Tune callback) with a trial function that sleeps ``--epoch-seconds`` per epoch
instead of training. Efficiency = ideal wall time / measured wall time, where the ideal is
the total sleep of all epochs that ran divided by the number of trials that run at once.
It is measured twice in one run: with the MLflow callback writing to a SQLite store, and
with a tracker that writes nothing (the baseline).

Run: ``python -m bench.orchestration_overhead [--trials 30] [--epochs 1] [--epoch-seconds 5]``.
The defaults give trials of 5 seconds. With ``--epochs 5 --epoch-seconds 1`` ASHA stops
most trials after their first epoch, so most trials last 1 second and the fixed cost of
starting a trial weighs five times more.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from orchestrator.tracking import Tracker
from orchestrator.tuning import TuningSettings, tune_cell
from search_spaces import load_space
from trainables.train import DataBundle, TrainingSetup


def sleeping_trial(config, setup: TrainingSetup, data: DataBundle) -> None:
    """Report once per epoch after sleeping, with a checkpoint, like the real trial function."""
    from ray import tune

    seconds = float(os.environ.get("HPO_BENCH_EPOCH_SECONDS", "1"))
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = int(Path(directory, "epoch").read_text())
    for epoch in range(start + 1, setup.epochs + 1):
        time.sleep(seconds)
        score = 1 - 1 / (1 + epoch * config["learning_rate"] * 10)
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "epoch").write_text(str(epoch))
            tune.report({"epoch": epoch, "val_accuracy": score}, checkpoint=tune.Checkpoint.from_directory(directory))


class NullTracker:
    """A tracker that records nothing: the baseline without MLflow."""

    def start_run(self, name, tags, parent_id=None):
        return name

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def run_cell(tracker, storage: str, trials: int, epochs: int, concurrency: int) -> tuple[float, int]:
    """Return (wall seconds, epochs run) of one tuned cell."""
    space = load_space("table1").restrict({"loss": "ce"})
    settings = TuningSettings(
        preset="random", scheduler=None, num_samples=trials, max_epochs=epochs, reduction_factor=3,
        seed=0, max_concurrent=concurrency, metric="val_accuracy", mode="max", min_trials_at_budget=2,
        cpus_per_trial=1, gpus_per_trial=0, max_failures=0,
    )
    setup = TrainingSetup("synthetic", "mlp", "ce", 10, (1, 8, 8), epochs=epochs)
    data = DataBundle(np.zeros((1, 1, 8, 8), np.uint8), np.zeros(1, np.int64),
                      np.zeros((1, 1, 8, 8), np.uint8), np.zeros(1, np.int64), 10, (0.5,), (0.5,))
    parent = tracker.start_run("bench-cell", {"phase": "cell"})
    started = time.perf_counter()
    outcome = tune_cell("bench", setup, data, space, settings, tracker, parent, {}, storage,
                        trial_function=sleeping_trial)
    wall = time.perf_counter() - started
    return wall, sum(max(record.values, default=0) for record in outcome.records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="trials in the cell")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial (the scheduler's budget)")
    parser.add_argument("--epoch-seconds", type=float, default=5.0, help="sleep per epoch, seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["HPO_BENCH_EPOCH_SECONDS"] = str(args.epoch_seconds)

    concurrency = os.cpu_count() or 1
    ray.init(num_cpus=concurrency, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        tracker = Tracker(f"sqlite:///{directory}/mlflow.db", "overhead", "overhead", Path(directory) / "artifacts")
        for label, used in (("without MLflow", NullTracker()), ("with MLflow (SQLite)", tracker)):
            wall, epochs = run_cell(used, f"{directory}/ray-{len(rows)}", args.trials, args.epochs, concurrency)
            ideal = epochs * args.epoch_seconds / concurrency
            rows.append((label, wall, epochs, ideal))
    ray.shutdown()

    print(f"{args.trials} trials, up to {args.epochs} epochs of {args.epoch_seconds:g} s, "
          f"{concurrency} at once, preset random (ASHA)")
    print("| tracking | wall (s) | epochs run | ideal (s) | efficiency |")
    print("|---|---|---|---|---|")
    for label, wall, epochs, ideal in rows:
        print(f"| {label} | {wall:.1f} | {epochs} | {ideal:.1f} | {ideal / wall:.0%} |")


if __name__ == "__main__":
    main()
