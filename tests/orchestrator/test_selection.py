"""Tests of budget-aware winner selection on hand-built trial records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.errors import RunFailedError, SpecError
from orchestrator.selection import TrialRecord, find_common_budget, select_winner


def trial(
    trial_id: str, values: dict[int, float], status: str = "stopped", **kwargs
) -> TrialRecord:
    config = kwargs.pop("config", {"learning_rate": 0.01, "name": trial_id})
    return TrialRecord(trial_id=trial_id, config=config, values=values, status=status, **kwargs)


def curve(**values: float) -> dict[int, float]:
    """Build an epoch -> value mapping from keywords such as ``e1=0.5, e3=0.7``."""
    return {int(key[1:]): value for key, value in values.items()}


# Trial "a" ran 9 epochs and has the best last report (0.80) but is the worst of the
# three at epoch 3, the largest epoch that at least two trials reached.
MIXED_BUDGETS = [
    trial(
        "a",
        curve(e1=0.50, e2=0.60, e3=0.70, e4=0.72, e5=0.74, e6=0.76, e7=0.78, e8=0.79, e9=0.80),
        "finished",
    ),
    trial("b", curve(e1=0.60, e2=0.70, e3=0.75)),
    trial("c", curve(e1=0.55, e2=0.65, e3=0.72)),
]


def test_winner_best_at_common_budget():
    selection = select_winner(MIXED_BUDGETS, mode="max", min_trials=2)

    assert selection.budget == 3
    assert selection.trial_id == "b"
    assert selection.value == 0.75
    assert selection.config == {"learning_rate": 0.01, "name": "b"}


def test_winner_ignores_best_last_report():
    best_last = max(MIXED_BUDGETS, key=lambda record: record.values[record.epochs_trained])
    assert best_last.trial_id == "a"

    selection = select_winner(MIXED_BUDGETS, min_trials=2)

    assert selection.trial_id != best_last.trial_id
    assert selection.ranking == [("b", 0.75), ("c", 0.72), ("a", 0.70)]


def test_selection_records_epochs_trained():
    selection = select_winner(MIXED_BUDGETS, min_trials=2)

    assert selection.budgets == {"a": 9, "b": 3, "c": 3}


def test_budget_is_largest_epoch_reached_by_min_trials():
    trials = [
        trial("a", curve(e1=0.5, e3=0.70, e9=0.80), "finished"),
        trial("d", curve(e1=0.6, e3=0.78, e9=0.79), "finished"),
        trial("b", curve(e1=0.6, e3=0.75)),
    ]

    by_two = select_winner(trials, min_trials=2)
    by_three = select_winner(trials, min_trials=3)
    by_any = select_winner(trials, min_trials=1)

    assert (by_two.budget, by_two.trial_id, by_two.value) == (9, "a", 0.80)
    assert [trial_id for trial_id, _ in by_two.ranking] == ["a", "d"]
    assert (by_three.budget, by_three.trial_id, by_three.value) == (3, "d", 0.78)
    assert [trial_id for trial_id, _ in by_three.ranking] == ["d", "b", "a"]
    assert (by_any.budget, by_any.trial_id) == (9, "a")


def test_fewer_trials_than_min_trials():
    trials = [
        trial("a", curve(e1=0.5, e2=0.6, e3=0.9)),
        trial("b", curve(e1=0.6, e2=0.7)),
    ]

    selection = select_winner(trials, min_trials=5)

    # Both trials reached epoch 2, the largest epoch all of them share
    assert selection.budget == 2
    assert selection.trial_id == "b"


def test_single_trial_compared_at_its_last_epoch():
    selection = select_winner([trial("only", curve(e1=0.4, e2=0.5, e3=0.45))], min_trials=2)

    assert selection.budget == 3
    assert selection.value == 0.45
    assert selection.ranking == [("only", 0.45)]


def test_error_trials_excluded():
    trials = [
        trial("e", curve(e1=0.9, e2=0.95, e3=0.99, e4=0.99), "error"),
        trial("a", curve(e1=0.5, e2=0.6, e3=0.7, e4=0.8), "finished"),
        trial("b", curve(e1=0.6, e2=0.65)),
    ]

    selection = select_winner(trials, min_trials=2)

    # Counting the errored trial would give a budget of 4 with "e" as winner
    assert selection.budget == 2
    assert selection.trial_id == "b"
    assert "e" not in dict(selection.ranking)
    assert selection.budgets["e"] == 4


def test_trials_without_reports_excluded():
    trials = [trial("empty", {}), trial("a", curve(e1=0.5, e2=0.6))]

    selection = select_winner(trials, min_trials=2)

    assert selection.trial_id == "a"
    assert selection.budget == 2
    assert selection.budgets == {"empty": 0, "a": 2}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_non_finite_values_rank_worst(mode):
    trials = [
        trial("nan", curve(e1=math.nan)),
        trial("plus_inf", curve(e1=math.inf)),
        trial("minus_inf", curve(e1=-math.inf)),
        trial("finite_high", curve(e1=0.9)),
        trial("finite_low", curve(e1=0.1)),
    ]

    selection = select_winner(trials, mode=mode)
    order = [trial_id for trial_id, _ in selection.ranking]

    assert selection.trial_id == ("finite_high" if mode == "max" else "finite_low")
    assert set(order[:2]) == {"finite_high", "finite_low"}
    # Non-finite values are ordered by trial id only
    assert order[2:] == ["minus_inf", "nan", "plus_inf"]


def test_all_non_finite_raises():
    trials = [trial("a", curve(e1=math.nan)), trial("b", curve(e1=math.inf))]

    with pytest.raises(RunFailedError, match="no finite value at epoch 1 in cell mnist/mlp/ce"):
        select_winner(trials, label="mnist/mlp/ce")


def test_mode_min_picks_smallest():
    trials = [
        trial("a", curve(e1=2.0, e2=1.5)),
        trial("b", curve(e1=1.8, e2=1.2)),
        trial("c", curve(e1=1.0, e2=1.3)),
    ]

    selection = select_winner(trials, mode="min", min_trials=2)

    assert (selection.trial_id, selection.budget, selection.value) == ("b", 2, 1.2)
    assert [trial_id for trial_id, _ in selection.ranking] == ["b", "c", "a"]


@pytest.mark.parametrize("order", [("t2", "t10", "t1"), ("t1", "t10", "t2"), ("t10", "t2", "t1")])
def test_ties_broken_by_trial_id(order):
    trials = [trial(trial_id, curve(e1=0.5, e2=0.7)) for trial_id in order]

    selection = select_winner(trials)

    assert selection.trial_id == "t1"
    assert [trial_id for trial_id, _ in selection.ranking] == ["t1", "t10", "t2"]


def test_diverged_trial_ranks_after_stable_ones():
    trials = [
        trial("wild", curve(e1=0.6, e2=0.9), diverged=True),
        trial("calm", curve(e1=0.5, e2=0.6)),
    ]

    selection = select_winner(trials)

    assert selection.trial_id == "calm"
    assert [trial_id for trial_id, _ in selection.ranking] == ["calm", "wild"]


def test_only_diverged_trials_still_select():
    trials = [
        trial("a", curve(e1=0.3), diverged=True),
        trial("b", curve(e1=0.4), diverged=True),
    ]

    assert select_winner(trials).trial_id == "b"


def test_empty_trials_raise_with_label():
    with pytest.raises(RunFailedError, match="no trial to select from in cell svhn/vgg13/lr"):
        select_winner([], label="svhn/vgg13/lr")


def test_all_error_trials_raise():
    trials = [trial("a", curve(e1=0.5), "error"), trial("b", {}, "error")]

    with pytest.raises(RunFailedError, match="2 trials, 2 ended in error"):
        select_winner(trials)


def test_invalid_mode_rejected():
    with pytest.raises(SpecError, match="invalid mode 'maximum': expected one of max, min"):
        select_winner(MIXED_BUDGETS, mode="maximum")


def test_invalid_min_trials_rejected():
    with pytest.raises(SpecError, match="invalid min_trials 0"):
        select_winner(MIXED_BUDGETS, min_trials=0)


def test_record_rejects_unknown_status():
    with pytest.raises(ValueError, match="invalid status 'paused' of trial 'x'"):
        TrialRecord(trial_id="x", config={}, values={1: 0.5}, status="paused")


def test_record_rejects_epoch_zero():
    with pytest.raises(ValueError, match="invalid epoch 0 in trial 'x': epochs start at 1"):
        TrialRecord(trial_id="x", config={}, values={0: 0.5, 1: 0.6})


def test_record_converts_numpy_values():
    record = TrialRecord(
        trial_id="x",
        config={"lr_multiplier": np.float64(0.1), "depth": np.int64(3), "pair": [np.float32(0.5)]},
        values={np.int64(2): np.float32(0.25), np.int64(1): np.float64(0.125)},
        diverged=np.bool_(False),
    )

    assert type(record.config["lr_multiplier"]) is float
    assert type(record.config["depth"]) is int
    assert type(record.config["pair"][0]) is float
    assert list(record.values) == [1, 2]
    assert all(type(epoch) is int for epoch in record.values)
    assert all(type(value) is float for value in record.values.values())
    assert record.diverged is False
    assert record.epochs_trained == 2


def test_common_budget_with_gaps_in_reports():
    # No epoch is shared by two trials, so the budget falls back to a single trial
    trials = [trial("a", curve(e1=0.5)), trial("b", curve(e2=0.6, e3=0.7))]

    assert find_common_budget(trials, min_trials=2) == 3
    assert find_common_budget([*trials, trial("c", curve(e2=0.4))], min_trials=3) == 2
