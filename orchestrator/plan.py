"""Study plans computed without training: cells, Hyperband brackets, epochs per phase.

The Hyperband arithmetic follows Li et al., "Hyperband: A Novel Bandit-Based Approach to
Hyperparameter Optimization", JMLR 2018. Symbols: R = ``max_epochs`` (maximum budget of a
trial), eta = ``reduction_factor``, s_max = floor(log_eta(R)) = ``max_bracket``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.spec import StudySpec


@dataclass(frozen=True)
class Rung:
    """One successive-halving step: how many trials train up to how many epochs."""

    trials: int
    epochs: int


@dataclass(frozen=True)
class Bracket:
    """One Hyperband bracket: its size and the rungs its trials climb."""

    index: int
    trials: int
    rungs: tuple[Rung, ...]

    @property
    def epochs(self) -> int:
        """Epochs trained by the whole bracket, each trial counted up to where it stops."""
        total = 0
        previous = 0
        for rung in self.rungs:
            total += rung.trials * (rung.epochs - previous)
            previous = rung.epochs
        return total


def max_bracket(max_epochs: int, reduction_factor: float) -> int:
    """Return s_max, the index of the most exploratory bracket (0 when R < eta)."""
    if max_epochs < reduction_factor:
        return 0
    # The small epsilon keeps exact powers (R = eta**k) from rounding down to k - 1.
    return int(math.floor(math.log(max_epochs) / math.log(reduction_factor) + 1e-9))


def successive_halving(trials: int, max_epochs: int, reduction_factor: float, index: int) -> tuple[Rung, ...]:
    """Return the rungs of a bracket of ``trials`` trials that starts at R * eta**-index epochs."""
    rungs = []
    for step in range(index + 1):
        survivors = int(trials // reduction_factor**step)
        epochs = int(round(max_epochs * reduction_factor ** (step - index)))
        if survivors < 1:
            break
        rungs.append(Rung(survivors, max(1, min(max_epochs, epochs))))
    return tuple(rungs)


def hyperband_brackets(num_samples: int, max_epochs: int, reduction_factor: float) -> list[Bracket]:
    """Distribute ``num_samples`` trials over Hyperband brackets, most exploratory first.

    Bracket s contains ceil((s_max + 1) / (s + 1) * eta**s) trials; when the samples run out,
    the last bracket is partly filled. Brackets repeat when there are more samples than one
    round holds. This is the schedule of the paper; Ray Tune's scheduler fills brackets in
    the same order but may place a paused trial differently, so the epoch count is an
    estimate.
    """
    top = max_bracket(max_epochs, reduction_factor)
    brackets = []
    remaining = num_samples
    while remaining > 0:
        for index in range(top, -1, -1):
            size = math.ceil((top + 1) / (index + 1) * reduction_factor**index)
            trials = min(size, remaining)
            if trials <= 0:
                break
            brackets.append(Bracket(index, trials, successive_halving(trials, max_epochs, reduction_factor, index)))
            remaining -= trials
    return brackets


def asha_epochs(num_samples: int, max_epochs: int, reduction_factor: float, grace_period: int = 1) -> int:
    """Estimate the epochs of asynchronous successive halving: 1/eta of trials pass each rung."""
    total = 0.0
    previous = 0
    survivors = float(num_samples)
    epochs = grace_period
    while True:
        total += survivors * (min(epochs, max_epochs) - previous)
        previous = min(epochs, max_epochs)
        if epochs >= max_epochs:
            break
        survivors /= reduction_factor
        epochs = int(epochs * reduction_factor)
    return int(round(total))


@dataclass(frozen=True)
class StudyPlan:
    """Numbers that ``hpo plan`` prints."""

    cells: int
    trials_per_cell: int
    brackets: list[Bracket]
    tuning_epochs_per_cell: int
    retrains_per_cell: int
    retrain_epochs: int
    validation_fraction: float

    @property
    def tuning_epochs(self) -> int:
        return self.cells * self.tuning_epochs_per_cell

    @property
    def retrain_epochs_total(self) -> int:
        return self.cells * self.retrains_per_cell * self.retrain_epochs

    @property
    def epoch_equivalents(self) -> float:
        """Total work in epochs over the full training set; a tuning epoch covers 1 - f of it."""
        return self.tuning_epochs * (1 - self.validation_fraction) + self.retrain_epochs_total


def plan_study(spec: StudySpec) -> StudyPlan:
    """Compute the plan of ``spec`` without touching data, Ray or MLflow."""
    tuning = spec.tuning
    max_epochs = tuning.max_epochs or spec.training.epochs
    brackets = hyperband_brackets(tuning.num_samples, max_epochs, tuning.reduction_factor)
    if uses_asha(spec):
        tuning_epochs = asha_epochs(tuning.num_samples, max_epochs, tuning.reduction_factor)
    else:
        tuning_epochs = sum(bracket.epochs for bracket in brackets)
    return StudyPlan(
        cells=len(spec.cells()),
        trials_per_cell=tuning.num_samples,
        brackets=brackets,
        tuning_epochs_per_cell=tuning_epochs,
        retrains_per_cell=len(spec.retrain.noise_levels) * len(spec.retrain.seeds),
        retrain_epochs=spec.training.epochs,
        validation_fraction=spec.data.validation_fraction,
    )


def uses_asha(spec: StudySpec) -> bool:
    """Tell whether the study's trials are scheduled by ASHA rather than Hyperband."""
    if spec.tuning.scheduler is not None:
        return spec.tuning.scheduler == "asha"
    return spec.tuning.search == "random"


def format_plan(spec: StudySpec, plan: StudyPlan) -> str:
    """Render the plan as the text ``hpo plan`` prints."""
    lines = [f"study {spec.name}: {plan.cells} cells, tracking {spec.resolved_tracking_uri}"]
    for cell in spec.cells():
        lines.append(f"  cell {cell}")
    scheduler = "asha" if uses_asha(spec) else "hyperband"
    max_epochs = spec.tuning.max_epochs or spec.training.epochs
    lines.append(
        f"tuning: preset {spec.tuning.search}, scheduler {scheduler}, {plan.trials_per_cell} trials "
        f"per cell, up to {max_epochs} epochs each, reduction factor {spec.tuning.reduction_factor:g}"
    )
    if scheduler == "hyperband":
        for bracket in plan.brackets:
            rungs = ", ".join(f"{rung.trials} x {rung.epochs} ep" for rung in bracket.rungs)
            noun = "trial" if bracket.trials == 1 else "trials"
            lines.append(f"  bracket s={bracket.index}: {bracket.trials} {noun}; rungs {rungs}; {bracket.epochs} epochs")
    lines.append(f"  about {plan.tuning_epochs_per_cell} trial epochs per cell, {plan.tuning_epochs} in all (estimate)")
    lines.append(
        f"retraining: {plan.retrains_per_cell} runs per cell (eta {list(spec.retrain.noise_levels)} x seeds "
        f"{list(spec.retrain.seeds)}), {plan.retrain_epochs} epochs each, {plan.retrain_epochs_total} epochs in all"
    )
    lines.append(f"total: about {plan.epoch_equivalents:.0f} epoch-equivalents over the full training set")
    return "\n".join(lines)
