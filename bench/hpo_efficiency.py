"""HPO-efficiency benchmark: regret against cumulative epochs for every search preset.

The problem is a synthetic learning curve over the Table 1 space for label smoothing
(learning rate, learning-rate multiplier, smoothing alpha) with a known optimum, so a
run costs milliseconds per epoch. The final validation error is

    0.05 + 0.08 * d**2 + multiplier penalty + 0.5 * (alpha - 0.1)**2,  capped at 0.9,

with ``d = log10(learning_rate / 0.05)`` and penalties 0.03, 0, 0.02 for the
multipliers 0.01, 0.1, 0.5. The optimum is 0.05 at learning rate 0.05, multiplier 0.1
and alpha 0.1. Each curve starts at 0.9 and decays as exp(-rate * epoch) with
``rate = 0.25 * (learning_rate / 0.05) ** 0.3``, so large learning rates look best in
the first epochs and lose at the full budget: low fidelities are informative but biased.
The curves are noise free.

Methods: the presets ``bohb``, ``skopt`` and ``random`` (``orchestrator.searchers``),
each run through real Ray Tune with a function trainable that checkpoints every epoch,
and Optuna's TPE sampler with its Hyperband pruner (``optuna-tpe``), which runs in
Optuna's own loop. Every method gets the same total budget of epochs and starts one
trial at a time, so all learn from the same amount of information.

Regret after b epochs: the true final error of the incumbent minus the optimum. The
incumbent is the configuration with the best value at the largest budget any trial
has reached within those b epochs. Curves are summarised by the median and quartiles
over seeds.

Run: ``python -m bench.hpo_efficiency [--seeds 10] [--max-t 27] [--budget 540]
[--output hpo_efficiency.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from orchestrator.searchers import build_search, search_health
from search_spaces import SearchSpace, load_space

logger = logging.getLogger(__name__)

METRIC = "val_error"
REDUCTION_FACTOR = 3
OPTIMUM = 0.05
INITIAL_ERROR = 0.9
BEST_LEARNING_RATE = 0.05
BEST_ALPHA = 0.1
MULTIPLIER_PENALTY = {0.01: 0.03, 0.1: 0.0, 0.5: 0.02}


# Problem -----------------------------------------------------------------------------


def final_error(config: dict[str, Any]) -> float:
    """Validation error at the full budget (the curve's limit); the optimum is ``OPTIMUM``."""
    decades = math.log10(config["learning_rate"] / BEST_LEARNING_RATE)
    error = (
        OPTIMUM
        + 0.08 * decades**2
        + MULTIPLIER_PENALTY[config["lr_multiplier"]]
        + 0.5 * (config["smoothing_alpha"] - BEST_ALPHA) ** 2
    )
    return min(error, INITIAL_ERROR)


def validation_error(config: dict[str, Any], epoch: int) -> float:
    """Validation error after ``epoch`` epochs of the synthetic learning curve."""
    rate = 0.25 * (config["learning_rate"] / BEST_LEARNING_RATE) ** 0.3
    floor = final_error(config)
    return floor + (INITIAL_ERROR - floor) * math.exp(-rate * epoch)


def curve_trainable(config: dict[str, Any], max_t: int) -> None:
    """Ray Tune function trainable: one report and one checkpoint per epoch, resumable."""
    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_epoch = int(Path(folder, "epoch").read_text())
    for epoch in range(start_epoch + 1, max_t + 1):
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "epoch").write_text(str(epoch))
            metrics = {METRIC: validation_error(config, epoch), "epoch": epoch}
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


@dataclass(frozen=True)
class Observation:
    """One reported epoch: which configuration, at which budget (epochs), with which error."""

    trial: str
    config: tuple[tuple[str, Any], ...]
    epoch: int
    value: float


# Regret ------------------------------------------------------------------------------


def regret_curve(observations: Sequence[Observation], budget: int) -> np.ndarray:
    """Return the incumbent's regret after each of the first ``budget`` epochs.

    Entry ``b - 1`` covers the first ``b`` observations in arrival order. Before the
    first observation nothing is known, so entries beyond the observations repeat the
    last value, and a run with no observations has regret ``INITIAL_ERROR - OPTIMUM``.
    """
    curve = np.full(budget, INITIAL_ERROR - OPTIMUM)
    best_at_budget: dict[int, tuple[float, tuple[tuple[str, Any], ...]]] = {}
    regret = INITIAL_ERROR - OPTIMUM
    for index, observation in enumerate(observations[:budget]):
        best = best_at_budget.get(observation.epoch)
        if best is None or observation.value < best[0]:
            best_at_budget[observation.epoch] = (observation.value, observation.config)
        incumbent = best_at_budget[max(best_at_budget)][1]
        regret = final_error(dict(incumbent)) - OPTIMUM
        curve[index] = regret
    curve[len(observations[:budget]):] = regret
    return curve


def budget_to_reach(curve: np.ndarray, target: float) -> int | None:
    """Return the first budget (epochs) at which ``curve`` is at or below ``target``, or None."""
    reached = np.flatnonzero(curve <= target + 1e-12)
    return int(reached[0]) + 1 if reached.size else None


# Methods -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """Settings shared by every method of one benchmark run."""

    space: SearchSpace
    max_t: int
    budget: int
    storage: Path


@dataclass(frozen=True)
class MethodRun:
    """Output of one method for one seed: the observations in order and health counters."""

    observations: list[Observation]
    health: dict[str, int]


def run_ray_preset(preset: str, seed: int, settings: RunSettings) -> MethodRun:
    """Run one preset through Ray Tune until ``budget`` epochs were reported."""
    plan = build_search(
        preset,
        settings.space,
        metric=METRIC,
        mode="min",
        max_t=settings.max_t,
        reduction_factor=REDUCTION_FACTOR,
        num_samples=30,
        seed=seed,
        max_concurrent=1,
    )
    recorder = BudgetRecorder()
    folder = Path(tempfile.mkdtemp(prefix=f"{preset}-{seed}-", dir=settings.storage))
    tuner = tune.Tuner(
        tune.with_parameters(curve_trainable, max_t=settings.max_t),
        tune_config=tune.TuneConfig(
            search_alg=plan.search_alg, scheduler=plan.scheduler, num_samples=-1, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            storage_path=str(folder),
            name="run",
            verbose=0,
            callbacks=[recorder],
            stop=BudgetStopper(recorder, settings.budget),
        ),
    )
    tuner.fit()
    shutil.rmtree(folder, ignore_errors=True)
    return MethodRun(recorder.observations, search_health(plan.search_alg))


def run_optuna(seed: int, settings: RunSettings) -> MethodRun:
    """Run Optuna's TPE sampler with its Hyperband pruner for ``budget`` epochs, one trial at a time."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    observations: list[Observation] = []

    def objective(trial: optuna.Trial) -> float:
        config = {parameter.name: _OPTUNA_SUGGEST[parameter.kind](trial, parameter) for parameter in settings.space.parameters}
        value = INITIAL_ERROR
        for epoch in range(1, settings.max_t + 1):
            if len(observations) >= settings.budget:
                trial.study.stop()
                raise optuna.TrialPruned()
            value = validation_error(config, epoch)
            observations.append(Observation(str(trial.number), tuple(config.items()), epoch, value))
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    # The pruner assigns brackets by a hash of the study name, so the name is fixed per seed.
    study = optuna.create_study(
        study_name=f"hpo-efficiency-{seed}",
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=settings.max_t, reduction_factor=REDUCTION_FACTOR
        ),
    )
    study.optimize(objective, n_trials=100 * settings.budget)
    return MethodRun(observations, {"suggested": len(study.trials)})


_OPTUNA_SUGGEST: dict[str, Callable[[Any, Any], Any]] = {
    "float": lambda trial, p: trial.suggest_float(p.name, p.low, p.high, log=p.log),
    "int": lambda trial, p: trial.suggest_int(p.name, p.low, p.high, log=p.log),
    "categorical": lambda trial, p: trial.suggest_categorical(p.name, list(p.choices)),
}


class BudgetRecorder(tune.Callback):
    """Tune callback that records every result on the driver, in arrival order."""

    def __init__(self) -> None:
        self.observations: list[Observation] = []

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        config = tuple(sorted(trial.config.items()))
        self.observations.append(
            Observation(trial.trial_id, config, int(result["training_iteration"]), float(result[METRIC]))
        )


class BudgetStopper(tune.Stopper):
    """Stop the whole run once the recorder contains ``budget`` epochs."""

    def __init__(self, recorder: BudgetRecorder, budget: int) -> None:
        self.recorder = recorder
        self.budget = budget

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return len(self.recorder.observations) >= self.budget


METHODS: dict[str, Callable[[int, RunSettings], MethodRun]] = {
    "bohb": lambda seed, settings: run_ray_preset("bohb", seed, settings),
    "skopt": lambda seed, settings: run_ray_preset("skopt", seed, settings),
    "random": lambda seed, settings: run_ray_preset("random", seed, settings),
    "optuna-tpe": run_optuna,
}
"""Benchmarked methods by name; ``random`` is the baseline."""


# Report ------------------------------------------------------------------------------


def summarise(
    curves: dict[str, np.ndarray], health: dict[str, list[dict[str, int]]], budget: int, max_t: int
) -> dict[str, Any]:
    """Return median and quartile regret at checkpoints, the budget to reach random's final regret
    and the summed health counters of each method."""
    checkpoints = sorted({max_t, budget // 8, budget // 4, budget // 2, budget} - {0})
    target = float(np.median(curves["random"][:, -1]))
    summary: dict[str, Any] = {"target_regret": target, "checkpoints": checkpoints, "methods": {}}
    for name, runs in curves.items():
        median = np.median(runs, axis=0)
        summary["methods"][name] = {
            "median": [float(median[b - 1]) for b in checkpoints],
            "quartiles": [
                [float(np.percentile(runs[:, b - 1], 25)), float(np.percentile(runs[:, b - 1], 75))]
                for b in checkpoints
            ],
            "budget_to_target": budget_to_reach(median, target),
            "final_per_seed": [float(value) for value in runs[:, -1]],
            "health": {key: sum(counters.get(key, 0) for counters in health[name]) for key in health[name][0]},
        }
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Render the summary as a Markdown table."""
    checkpoints = summary["checkpoints"]
    header = "| method | " + " | ".join(f"regret @ {b} epochs" for b in checkpoints)
    header += " | epochs to reach random's final regret |"
    lines = [header, "|" + "---|" * (len(checkpoints) + 2)]
    for name, result in summary["methods"].items():
        cells = [
            f"{median:.4f} [{low:.4f}, {high:.4f}]"
            for median, (low, high) in zip(result["median"], result["quartiles"])
        ]
        reached = result["budget_to_target"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {reached if reached is not None else 'not reached'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every method for every seed, then print and write the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds per method (default 10)")
    parser.add_argument("--max-t", type=int, default=27, help="epochs of a full-budget trial (default 27)")
    parser.add_argument("--budget", type=int, default=540, help="total epochs per method and seed (default 540)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument("--output", type=Path, default=Path("hpo_efficiency.json"), help="JSON file for the summary")
    arguments = parser.parse_args(argv)
    if "random" not in arguments.methods:
        parser.error("--methods must include random, the baseline")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import cloudpickle
    import ray

    # Ship the trainable by value, so trial workers skip this module's imports.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    storage = Path(tempfile.mkdtemp(prefix="hpo-efficiency-"))
    settings = RunSettings(
        space=load_space("table1").restrict({"loss": "ls"}), max_t=arguments.max_t, budget=arguments.budget, storage=storage
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.monotonic()
    curves: dict[str, np.ndarray] = {}
    health: dict[str, list[dict[str, int]]] = {}
    seconds: dict[str, float] = {}
    try:
        for name in arguments.methods:
            method_started = time.monotonic()
            runs, health[name] = [], []
            for seed in range(arguments.seeds):
                run = METHODS[name](seed, settings)
                runs.append(regret_curve(run.observations, settings.budget))
                health[name].append(run.health)
                print(f"{name} seed {seed}: final regret {runs[-1][-1]:.4f}, health {run.health}", flush=True)
            curves[name] = np.stack(runs)
            seconds[name] = time.monotonic() - method_started
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)

    summary = summarise(curves, health, settings.budget, settings.max_t)
    summary.update(
        seeds=arguments.seeds,
        max_t=settings.max_t,
        budget=settings.budget,
        reduction_factor=REDUCTION_FACTOR,
        seconds_per_method=seconds,
        total_seconds=time.monotonic() - started,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    )
    table = format_table(summary)
    print(table)
    print(f"target (random's median final regret): {summary['target_regret']:.4f}")
    for name, result in summary["methods"].items():
        print(f"health of {name}, summed over seeds: {result['health']}")
    print(f"wall time per method (s): {json.dumps({k: round(v) for k, v in seconds.items()})}")
    arguments.output.write_text(json.dumps({**summary, "table": table}, indent=2))
    print(f"summary written to {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
