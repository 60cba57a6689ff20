"""Budget-aware winner selection for one cell (dataset x model x loss).

Under Hyperband most trials stop long before the maximum epoch count, so their last
reports were taken after different amounts of training. Ranking trials by their last
report therefore compares a 3-epoch trial with a 27-epoch one. This module compares every
candidate at one common budget instead:

- A trial *reached* epoch ``e`` when it reported a value for epoch ``e``.
- ``required = min(min_trials, number of eligible trials)``, where eligible trials are
  the trials that did not end in error and reported at least one epoch.
- The common budget is the largest epoch reached by at least ``required`` eligible trials.
  With fewer eligible trials than ``min_trials`` this is the largest epoch that all of
  them reached. With a single eligible trial it is that trial's last epoch.
- The candidates are the eligible trials that reached the budget, ranked by their value
  AT the budget, never by a later report.

Pure logic: no Ray and no MLflow, so the rules are tested on hand-built trial records.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import RunFailedError, SpecError

__all__ = [
    "MODE_SIGNS",
    "TRIAL_STATUSES",
    "Selection",
    "TrialRecord",
    "find_common_budget",
    "select_winner",
]

logger = logging.getLogger(__name__)

# Trial outcomes: "finished" trials ran to their last epoch, "stopped" trials were stopped
# early by the scheduler and "error" trials raised. Only "error" trials are left out.
TRIAL_STATUSES = ("finished", "stopped", "error")

# Optimisation direction as a sign, so that ranking handles one direction only:
# a larger ``sign * value`` is better.
MODE_SIGNS = {"max": 1.0, "min": -1.0}


def _to_plain(value: Any) -> Any:
    """Convert numpy scalars (and containers of them) to plain Python values."""
    if isinstance(value, Mapping):
        return {str(key): _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(item) for item in value)
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        # numpy scalars and zero-dimensional arrays expose ``item()``
        return item()
    return value


@dataclass(frozen=True)
class TrialRecord:
    """Outcome of one tuning trial, as the selection needs it.

    ``values`` maps each epoch the trial reported (1-based) to its metric value, for
    example the validation accuracy as a fraction. ``config`` contains the sampled
    hyperparameters. Numpy scalars in ``config`` and ``values`` are converted to plain
    Python values on construction, so the record can be logged and serialised as is.

    Raises ``ValueError`` for an unknown status or an epoch below 1.
    """

    trial_id: str
    config: dict[str, Any]
    values: dict[int, float]
    status: str = "finished"
    diverged: bool = False

    def __post_init__(self) -> None:
        if self.status not in TRIAL_STATUSES:
            raise ValueError(
                f"invalid status {self.status!r} of trial {self.trial_id!r}: "
                f"expected one of {', '.join(TRIAL_STATUSES)}"
            )
        values = {int(epoch): float(value) for epoch, value in self.values.items()}
        early = [epoch for epoch in values if epoch < 1]
        if early:
            raise ValueError(
                f"invalid epoch {min(early)} in trial {self.trial_id!r}: epochs start at 1"
            )
        object.__setattr__(self, "trial_id", str(self.trial_id))
        object.__setattr__(self, "config", _to_plain(dict(self.config)))
        object.__setattr__(self, "values", dict(sorted(values.items())))
        object.__setattr__(self, "diverged", bool(self.diverged))

    @property
    def epochs_trained(self) -> int:
        """Last epoch the trial reported; 0 when it reported none."""
        return max(self.values, default=0)


@dataclass(frozen=True)
class Selection:
    """Winner of one cell and the evidence behind it.

    ``budget`` is the common epoch at which candidates were compared and ``value`` the
    winner's metric at that epoch. ``budgets`` maps every trial passed in (errored ones
    included) to the number of epochs it actually trained. ``ranking`` lists the
    candidates best first as ``(trial_id, value at budget)``.
    """

    trial_id: str
    config: dict[str, Any]
    budget: int
    value: float
    budgets: dict[str, int] = field(default_factory=dict)
    ranking: list[tuple[str, float]] = field(default_factory=list)


def select_winner(
    trials: Iterable[TrialRecord],
    *,
    mode: str = "max",
    min_trials: int = 2,
    label: str | None = None,
) -> Selection:
    """Select the best trial at the largest epoch that ``min_trials`` trials reached.

    The budget rules are in the module docstring. Candidates are ordered by these keys:

    1. trials that did not diverge before those that did, because the winner is retrained
       for the full epoch count, where a diverging configuration would diverge again;
    2. finite values before NaN or infinite ones;
    3. the better value for ``mode``;
    4. the smaller ``trial_id``, so that ties resolve the same way on every run.

    ``label`` names the cell in messages, for example ``"fashion_mnist/mlp/ce"``.

    Raises ``SpecError`` for an unknown ``mode`` or ``min_trials`` below 1, and
    ``RunFailedError`` when no trial is eligible or every candidate's value at the
    budget is NaN or infinite.
    """
    # Check the arguments and turn the mode into a sign once
    where = f" in cell {label}" if label else ""
    if mode not in MODE_SIGNS:
        raise SpecError(f"invalid mode {mode!r}: expected one of {', '.join(MODE_SIGNS)}")
    if min_trials < 1:
        raise SpecError(f"invalid min_trials {min_trials}: expected an integer of at least 1")
    sign = MODE_SIGNS[mode]
    trials = list(trials)

    # Keep the trials that ended without error and reported at least one epoch
    eligible = [trial for trial in trials if trial.status != "error" and trial.values]
    if not eligible:
        errored = sum(trial.status == "error" for trial in trials)
        raise RunFailedError(
            f"no trial to select from{where}: {len(trials)} trials, {errored} ended in error "
            "and the others reported no epoch; check the trial logs and rerun the cell"
        )

    # Find the common budget and the trials that reached it
    budget = find_common_budget(eligible, min_trials)
    candidates = [trial for trial in eligible if budget in trial.values]

    # Rank the candidates by their value at the budget
    ranked = sorted(candidates, key=lambda trial: _rank_key(trial, budget, sign))
    winner = ranked[0]
    if not math.isfinite(winner.values[budget]):
        raise RunFailedError(
            f"no finite value at epoch {budget}{where}: all {len(ranked)} candidates "
            "reported NaN or infinity; check the trial logs and the search space ranges"
        )
    logger.info(
        "selected trial %s%s: %s=%.6g at epoch %d, %d of %d trials compared",
        winner.trial_id,
        where,
        mode,
        winner.values[budget],
        budget,
        len(ranked),
        len(trials),
    )
    return Selection(
        trial_id=winner.trial_id,
        config=dict(winner.config),
        budget=budget,
        value=winner.values[budget],
        budgets={trial.trial_id: trial.epochs_trained for trial in trials},
        ranking=[(trial.trial_id, trial.values[budget]) for trial in ranked],
    )


def find_common_budget(trials: Iterable[TrialRecord], min_trials: int) -> int:
    """Return the largest epoch reached by ``min(min_trials, len(trials))`` of ``trials``.

    A trial reached an epoch when it reported a value for it. Trials report every epoch
    from 1 on, so the epochs they share always qualify. If gaps in the reports leave no
    epoch shared by that many trials, the number required is lowered one at a time.
    ``trials`` must be non-empty and every trial must have reported at least one epoch.
    """
    trials = list(trials)
    assert trials and all(trial.values for trial in trials)
    reached: dict[int, int] = {}
    for trial in trials:
        for epoch in trial.values:
            reached[epoch] = reached.get(epoch, 0) + 1

    target = min(min_trials, len(trials))
    for required in range(target, 0, -1):
        budgets = [epoch for epoch, count in reached.items() if count >= required]
        if budgets:
            break
    if required < target:
        logger.warning(
            "no epoch reached by %d trials because of gaps in their reports; "
            "comparing at the largest epoch reached by %d",
            target,
            required,
        )
    # With required == 1 every reported epoch qualifies, so budgets is never empty here
    return max(budgets)


def _rank_key(trial: TrialRecord, budget: int, sign: float) -> tuple[bool, bool, float, str]:
    value = trial.values[budget]
    finite = math.isfinite(value)
    return (trial.diverged, not finite, -sign * value if finite else 0.0, trial.trial_id)
