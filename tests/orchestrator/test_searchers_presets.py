"""Search presets driven directly through suggest, without Ray's execution engine."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, HyperBandForBOHB
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from orchestrator.searchers import (
    PRESETS,
    RandomSearcher,
    SeededTuneBOHB,
    SkOptSearcher,
    build_search,
    search_health,
)
from search_spaces import load_space
from trainables.errors import SpecError

SETTINGS = {
    "metric": "score",
    "mode": "max",
    "max_t": 9,
    "reduction_factor": 3,
    "num_samples": 12,
    "seed": 0,
    "max_concurrent": 0,
}


def table1(loss: str = "ls"):
    return load_space("table1").restrict({"loss": loss})


def score(config: dict) -> float:
    """Synthetic objective with its maximum at learning_rate 10^-1.5 and small alpha."""
    return -((math.log10(config["learning_rate"]) + 1.5) ** 2) - config.get("smoothing_alpha", 0.0)


def complete(searcher, trial_id: str, config: dict, budget: int = 9) -> None:
    """Report one result at ``budget`` epochs, as HyperBandForBOHB annotates it, then complete."""
    result = {"score": score(config), "training_iteration": budget, "hyperband_info": {"budget": budget}}
    searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result)


def first_configs(preset: str, seed: int, count: int = 10) -> list[dict]:
    plan = build_search(preset, table1(), **{**SETTINGS, "seed": seed})
    configs = []
    for index in range(count):
        config = plan.search_alg.suggest(f"t{index}")
        configs.append(config)
        complete(plan.search_alg, f"t{index}", config)
    return configs


# Registry ----------------------------------------------------------------------------

EXPECTED_PAIRS = {
    "bohb": (SeededTuneBOHB, HyperBandForBOHB),
    "skopt": (SkOptSearcher, HyperBandForBOHB),
    "random": (RandomSearcher, AsyncHyperBandScheduler),
}


def test_registry_names():
    assert set(PRESETS) == {"bohb", "skopt", "random"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_default_pair(preset):
    plan = build_search(preset, table1(), **SETTINGS)

    searcher_type, scheduler_type = EXPECTED_PAIRS[preset]
    assert type(plan.search_alg) is searcher_type
    assert type(plan.scheduler) is scheduler_type
    assert plan.scheduler._time_attr == "training_iteration"


@pytest.mark.parametrize(("preset", "scheduler"), [("skopt", "asha"), ("random", "hyperband")])
def test_scheduler_choice(preset, scheduler):
    plan = build_search(preset, table1(), scheduler=scheduler, **SETTINGS)

    expected = AsyncHyperBandScheduler if scheduler == "asha" else HyperBandForBOHB
    assert type(plan.scheduler) is expected


def test_asha_uses_grace_period():
    plan = build_search("random", table1(), grace_period=3, **SETTINGS)

    assert plan.scheduler._brackets[0]._rungs[-1][0] == 3


# Reproducibility and plain values ---------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_same_seed_same_first_configs(preset):
    first = first_configs(preset, seed=7)
    second = first_configs(preset, seed=7)
    other = first_configs(preset, seed=8)

    assert first == second
    assert first != other


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_suggestions_are_plain_python(preset):
    configs = first_configs(preset, seed=1)

    for config in configs:
        assert list(config) == ["learning_rate", "lr_multiplier", "smoothing_alpha"]
        assert all(type(value) is float for value in config.values())
        assert config["lr_multiplier"] in (0.01, 0.1, 0.5)
        assert 1e-5 <= config["learning_rate"] <= 0.5
    assert json.loads(json.dumps(configs)) == configs


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_points_to_evaluate_first(preset):
    points = [
        {"learning_rate": 0.1, "lr_multiplier": 0.5, "smoothing_alpha": 0.05},
        {"learning_rate": 1e-3, "lr_multiplier": 0.01, "smoothing_alpha": 0.2},
    ]
    plan = build_search(preset, table1(), points_to_evaluate=points, **SETTINGS)

    suggested = [plan.search_alg.suggest(f"t{index}") for index in range(3)]

    assert suggested[:2] == points
    assert suggested[2] not in points


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_global_numpy_rng_untouched(preset):
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)

    first_configs(preset, seed=2)

    assert np.random.rand() == expected


# Health ------------------------------------------------------------------------------


def test_bohb_model_based_picks_observed(caplog):
    plan = build_search("bohb", table1(), **{**SETTINGS, "num_samples": 30})
    for index in range(30):
        config = plan.search_alg.suggest(f"t{index}")
        complete(plan.search_alg, f"t{index}", config, budget=1)

    with caplog.at_level(logging.INFO, logger="orchestrator.searchers.health"):
        health = search_health(plan.search_alg)

    assert health["suggested"] == 30
    assert health["results"] == 30
    assert health["model_based"] > 0
    assert "search health of SeededTuneBOHB" in caplog.text


def test_bohb_random_before_model():
    plan = build_search("bohb", table1(), **SETTINGS)

    for index in range(5):
        plan.search_alg.suggest(f"t{index}")

    assert search_health(plan.search_alg) == {"suggested": 5, "model_based": 0, "results": 0}


def test_skopt_health_counts_told():
    plan = build_search("skopt", table1(), **SETTINGS)
    for index in range(6):
        complete(plan.search_alg, f"t{index}", plan.search_alg.suggest(f"t{index}"))
    plan.search_alg.suggest("pending")

    health = search_health(plan.search_alg)

    # num_samples 12 gives 4 random initial points.
    assert health == {
        "suggested": 7, "model_based": 3, "told": 6, "penalised": 0, "skipped": 0, "pending": 1, "pauses": 0
    }


def test_health_unwraps_tune_wrappers():
    plan = build_search("random", table1(), **SETTINGS)
    wrapped = SearchGenerator(ConcurrencyLimiter(plan.search_alg, max_concurrent=2))
    plan.search_alg.suggest("t0")

    assert search_health(wrapped) == {"suggested": 1, "completed": 0, "pauses": 0}


def test_health_rejects_foreign_searcher():
    with pytest.raises(TypeError, match=r"search_health supports the searchers of orchestrator.searchers, got object"):
        search_health(object())


# Concurrency ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_concurrency_limit(preset):
    plan = build_search(preset, table1(), **{**SETTINGS, "max_concurrent": 2})
    searcher = plan.search_alg

    assert searcher.suggest("t0") is not None
    assert searcher.suggest("t1") is not None
    assert searcher.suggest("t2") is None
    searcher.on_pause("t0")
    assert searcher.suggest("t2") is not None


# Invalid settings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"mode": "maximum"}, r"search setting mode='maximum' is invalid; use 'min' or 'max'"),
        ({"metric": ""}, r"search setting metric='' is invalid"),
        ({"max_t": 0}, r"search setting max_t=0 is invalid; use a whole number of epochs >= 1"),
        ({"reduction_factor": 1}, r"search setting reduction_factor=1 is invalid; use a number > 1"),
        ({"num_samples": 0}, r"search setting num_samples=0 is invalid"),
        ({"seed": None}, r"search setting seed=None is invalid; use an integer seed"),
        ({"max_concurrent": -1}, r"search setting max_concurrent=-1 is invalid"),
        ({"grace_period": 10}, r"search setting grace_period=10 is invalid; use a whole number of epochs in \[1, max_t=9\]"),
    ],
)
def test_invalid_setting_rejected(override, expected):
    with pytest.raises(SpecError, match=expected):
        build_search("skopt", table1(), **{**SETTINGS, **override})


def test_unknown_preset_rejected():
    with pytest.raises(SpecError, match=r"unknown search preset 'bohbb': expected one of bohb, skopt, random \(did you mean 'bohb'\?\)"):
        build_search("bohbb", table1(), **SETTINGS)


def test_unavailable_scheduler_rejected():
    with pytest.raises(SpecError, match=r"scheduler 'asha' is not available with search preset 'bohb': expected one of hyperband"):
        build_search("bohb", table1(), scheduler="asha", **SETTINGS)


def test_unrestricted_space_rejected():
    with pytest.raises(SpecError, match=r"cannot be used for search preset 'random'.*call restrict"):
        build_search("random", load_space("table1"), **SETTINGS)


# Saved state -------------------------------------------------------------------------


def test_bohb_save_restore_continues_identically(tmp_path):
    original = build_search("bohb", table1(), **SETTINGS).search_alg
    for index in range(10):
        complete(original, f"t{index}", original.suggest(f"t{index}"), budget=1)
    path = tmp_path / "bohb.pkl"
    original.save(str(path))
    restored = build_search("bohb", table1(), **{**SETTINGS, "seed": 99}).search_alg

    restored.restore(str(path))

    continued, expected = [], []
    for index in range(10, 20):
        for searcher, configs in ((restored, continued), (original, expected)):
            config = searcher.suggest(f"t{index}")
            configs.append(config)
            complete(searcher, f"t{index}", config, budget=1)
    assert continued == expected
    assert restored.health() == original.health()


def test_random_state_round_trip(tmp_path):
    original = build_search("random", table1(), **SETTINGS).search_alg
    for index in range(3):
        original.suggest(f"t{index}")
    path = tmp_path / "random.json"
    original.save(str(path))
    restored = build_search("random", table1(), **{**SETTINGS, "seed": 99}).search_alg

    restored.restore(str(path))

    restored.on_trial_complete("t1", {"score": 0.0})
    original.on_trial_complete("t1", {"score": 0.0})
    assert [restored.suggest(f"n{i}") for i in range(5)] == [original.suggest(f"n{i}") for i in range(5)]
    assert restored.health() == original.health()
