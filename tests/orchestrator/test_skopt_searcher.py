"""The scikit-optimize Searcher driven directly through suggest and on_trial_complete."""

from __future__ import annotations

import json
import logging
import math

import pytest

from orchestrator.searchers import SkOptSearcher, nonfinite_penalty
from search_spaces import load_space, parse_space
from trainables.errors import SpecError


def one_dimensional_space():
    return parse_space({"parameters": [{"name": "x", "type": "float", "low": -2.0, "high": 2.0}]}, "inline")


def peak(x: float) -> float:
    """Maximum 1.0 at x = 0.7."""
    return 1.0 - (x - 0.7) ** 2


def table1_ls():
    return load_space("table1").restrict({"loss": "ls"})


def table1_score(config: dict) -> float:
    return -((math.log10(config["learning_rate"]) + 1.5) ** 2) - config["smoothing_alpha"]


def make_searcher(space=None, **options) -> SkOptSearcher:
    settings = {"metric": "score", "mode": "max", "seed": 0, "n_initial_points": 4}
    settings.update(options)
    return SkOptSearcher(space or table1_ls(), **settings)


# Optimisation ------------------------------------------------------------------------


def test_maximisation_finds_maximum():
    searcher = make_searcher(one_dimensional_space(), n_initial_points=5)
    best_x, best_value = None, -math.inf

    for index in range(25):
        config = searcher.suggest(f"t{index}")
        value = peak(config["x"])
        searcher.on_trial_complete(f"t{index}", {"score": value})
        if value > best_value:
            best_x, best_value = config["x"], value

    assert abs(best_x - 0.7) < 0.1
    assert best_value > 0.99
    assert min(searcher._optimizer.yi) == pytest.approx(-best_value)
    assert searcher.health()["model_based"] == 20


def test_minimisation_told_unchanged():
    searcher = make_searcher(one_dimensional_space(), mode="min")

    searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"score": 0.25})

    assert searcher._optimizer.yi == [0.25]


# Non-finite, failed and early-stopped trials ----------------------------------------


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_nonfinite_result_told_as_penalty(bad_value, caplog):
    searcher = make_searcher()
    for index, value in enumerate([-1.0, -3.0]):
        searcher.suggest(f"t{index}")
        searcher.on_trial_complete(f"t{index}", {"score": value})
    searcher.suggest("bad")

    with caplog.at_level(logging.WARNING, logger="orchestrator.searchers.skopt_searcher"):
        searcher.on_trial_complete("bad", {"score": bad_value})

    # Objectives are negated scores 1 and 3: worst 3 plus spread 2.
    assert searcher._optimizer.yi[-1] == 5.0
    assert searcher.health()["penalised"] == 1
    assert "telling the penalty 5.0" in caplog.text
    for index in range(2, 8):
        config = searcher.suggest(f"t{index}")
        searcher.on_trial_complete(f"t{index}", {"score": table1_score(config)})
    assert all(math.isfinite(y) for y in searcher._optimizer.yi)


def test_nonfinite_before_any_finite_waits():
    searcher = make_searcher()
    searcher.suggest("bad")
    searcher.suggest("good")

    searcher.on_trial_complete("bad", {"score": math.nan})
    told_before = list(searcher._optimizer.yi)
    searcher.on_trial_complete("good", {"score": -2.0})

    assert told_before == []
    assert searcher._optimizer.yi == [2.0, 4.0]
    assert searcher.health()["penalised"] == 1


def test_repeated_nonfinite_penalty_stays_bounded():
    searcher = make_searcher()
    for index, value in enumerate([-1.0, -3.0, math.nan, math.nan, math.inf]):
        searcher.suggest(f"t{index}")
        searcher.on_trial_complete(f"t{index}", {"score": value})

    assert searcher._optimizer.yi == [1.0, 3.0, 5.0, 5.0, 5.0]


def test_nonfinite_penalty_rule():
    assert nonfinite_penalty([]) is None
    assert nonfinite_penalty([1.0, 3.0]) == 5.0
    assert nonfinite_penalty([2.0]) == 4.0
    assert nonfinite_penalty([0.1, 0.1]) == 1.1


def test_failed_trial_skipped(caplog):
    searcher = make_searcher()
    searcher.suggest("t0")
    searcher.on_trial_result("t0", {"score": -1.0, "training_iteration": 1})

    with caplog.at_level(logging.WARNING, logger="orchestrator.searchers.skopt_searcher"):
        searcher.on_trial_complete("t0", error=True)

    assert searcher._optimizer.yi == []
    assert searcher.health()["skipped"] == 1
    assert searcher.health()["pending"] == 0
    assert "trial t0 failed; its point" in caplog.text


def test_trial_without_results_skipped(caplog):
    searcher = make_searcher()
    searcher.suggest("t0")

    with caplog.at_level(logging.WARNING, logger="orchestrator.searchers.skopt_searcher"):
        searcher.on_trial_complete("t0", result=None)

    assert searcher._optimizer.yi == []
    assert searcher.health()["skipped"] == 1
    assert "trial t0 reported no numeric 'score' (got None)" in caplog.text


def test_non_numeric_result_skipped():
    searcher = make_searcher()
    searcher.suggest("t0")
    searcher.on_trial_result("t0", {"score": "diverged"})

    searcher.on_trial_complete("t0", {"score": "diverged"})

    assert searcher._optimizer.yi == []
    assert searcher.health()["skipped"] == 1


def test_early_stopped_trial_told_last_value():
    # A trial Ray stops while running gets its last result passed to on_trial_complete.
    searcher = make_searcher()
    searcher.suggest("t0")
    for epoch, score in enumerate([-3.0, -2.0, -1.5], 1):
        searcher.on_trial_result("t0", {"score": score, "training_iteration": epoch})

    searcher.on_trial_complete("t0", {"score": -1.5, "training_iteration": 3})

    assert searcher._optimizer.yi == [1.5]


def test_paused_then_stopped_trial_told_last_value():
    # Hyperband stops a paused trial with on_trial_complete(trial_id) and no result.
    searcher = make_searcher()
    searcher.suggest("t0")
    for epoch, score in enumerate([-3.0, -2.5], 1):
        searcher.on_trial_result("t0", {"score": score, "training_iteration": epoch})
    searcher.on_pause("t0")

    searcher.on_trial_complete("t0")

    assert searcher._optimizer.yi == [2.5]
    assert searcher.health()["skipped"] == 0


def test_unknown_trial_completion_ignored(caplog):
    searcher = make_searcher()

    with caplog.at_level(logging.WARNING, logger="orchestrator.searchers.skopt_searcher"):
        searcher.on_trial_complete("stranger", {"score": 1.0})

    assert searcher._optimizer.yi == []
    assert "trial stranger completed but was not suggested" in caplog.text


# Suggestions -------------------------------------------------------------------------


def test_categorical_values_keep_type():
    space = parse_space(
        {
            "parameters": [
                {"name": "multiplier", "type": "categorical", "choices": [0.01, 0.1, 0.5]},
                {"name": "activation", "type": "categorical", "choices": ["relu", "tanh", "gelu"]},
                {"name": "batch_norm", "type": "categorical", "choices": [True, False]},
                {"name": "width", "type": "categorical", "choices": [16, 32, 64]},
                {"name": "depth", "type": "int", "low": 1, "high": 9},
            ]
        },
        "inline",
    )
    searcher = make_searcher(space, n_initial_points=3)
    seen = []

    for index in range(10):
        config = searcher.suggest(f"t{index}")
        seen.append(config)
        score = config["multiplier"] + (config["activation"] == "gelu") + config["batch_norm"] + config["width"] / 64
        searcher.on_trial_complete(f"t{index}", {"score": score})

    assert searcher.health()["model_based"] == 7
    for config in seen:
        assert type(config["multiplier"]) is float
        assert type(config["activation"]) is str
        assert type(config["batch_norm"]) is bool
        assert type(config["width"]) is int
        assert type(config["depth"]) is int
    assert json.loads(json.dumps(seen)) == seen


def test_points_to_evaluate_come_first():
    points = [
        {"learning_rate": 0.1, "lr_multiplier": 0.5, "smoothing_alpha": 0.05},
        {"learning_rate": 1e-3, "lr_multiplier": 0.01, "smoothing_alpha": 0.2},
    ]
    searcher = make_searcher(points_to_evaluate=points)

    first, second, third = (searcher.suggest(f"t{index}") for index in range(3))

    assert [first, second] == points
    assert third not in points
    assert searcher.health()["model_based"] == 0


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ({"learning_rate": 0.1, "lr_multiplier": 0.5}, r"missing \['smoothing_alpha'\]"),
        ({"learning_rate": 0.1, "lr_multiplier": 0.5, "smoothing_alpha": 0.1, "x": 1}, r"unknown \['x'\]"),
        ({"learning_rate": 0.9, "lr_multiplier": 0.5, "smoothing_alpha": 0.1},
         r"value 0.9 of 'learning_rate' is outside the search space \(float in \[1e-05, 0.5\]\)"),
        ({"learning_rate": 0.1, "lr_multiplier": 0.2, "smoothing_alpha": 0.1},
         r"value 0.2 of 'lr_multiplier' is outside the search space \(one of \[0.01, 0.1, 0.5\]\)"),
    ],
)
def test_invalid_point_to_evaluate_rejected(point, expected):
    with pytest.raises(SpecError, match=r"point to evaluate #1 .*" + expected):
        make_searcher(points_to_evaluate=[point])


def test_pending_points_get_distinct_suggestions():
    searcher = make_searcher(n_initial_points=3)
    for index in range(3):
        config = searcher.suggest(f"t{index}")
        searcher.on_trial_complete(f"t{index}", {"score": table1_score(config)})

    parallel = [searcher.suggest(f"p{index}") for index in range(3)]

    assert len({tuple(config.values()) for config in parallel}) == 3


def test_concurrency_limit_counts_running_trials():
    searcher = make_searcher(max_concurrent=2)
    searcher.suggest("t0")
    searcher.suggest("t1")

    assert searcher.suggest("t2") is None
    searcher.on_pause("t0")
    assert searcher.suggest("t2") is not None
    assert searcher.suggest("t3") is None
    searcher.on_trial_complete("t1", {"score": -1.0})
    assert searcher.suggest("t3") is not None


def test_concurrency_limiter_overrides_limit():
    from ray.tune.search import ConcurrencyLimiter

    searcher = make_searcher(max_concurrent=0)
    limited = ConcurrencyLimiter(searcher, max_concurrent=1)

    assert limited.suggest("t0") is not None
    assert limited.suggest("t1") is None


def test_same_seed_same_sequence():
    def run(seed):
        searcher = make_searcher(seed=seed)
        configs = []
        for index in range(10):
            config = searcher.suggest(f"t{index}")
            configs.append(config)
            searcher.on_trial_complete(f"t{index}", {"score": table1_score(config)})
        return configs

    assert run(5) == run(5)
    assert run(5) != run(6)


# State -------------------------------------------------------------------------------


def drive(searcher, start, stop, pending=()):
    """Complete the pending trials, then suggest and complete trials start..stop-1."""
    configs = []
    for trial_id, config in pending:
        searcher.on_trial_complete(trial_id, {"score": table1_score(config)})
    for index in range(start, stop):
        config = searcher.suggest(f"t{index}")
        configs.append(config)
        searcher.on_trial_complete(f"t{index}", {"score": table1_score(config)})
    return configs


def test_save_restore_mid_run_continues_identically(tmp_path):
    original = make_searcher(max_concurrent=4)
    drive(original, 0, 6)
    pending = [(f"p{index}", original.suggest(f"p{index}")) for index in range(3)]
    original.on_trial_result("p0", {"score": -2.0, "training_iteration": 1})
    original.on_pause("p1")
    path = tmp_path / "searcher.json"

    original.save(str(path))
    restored = make_searcher(max_concurrent=4, seed=99)
    restored.restore(str(path))

    assert json.loads(path.read_text()) == original.get_state()
    assert restored.get_state() == original.get_state()
    # Trials started before the save complete on the restored searcher.
    continued = drive(restored, 6, 14, pending)
    expected = drive(original, 6, 14, pending)
    assert continued == expected
    assert restored.health() == original.health()
    assert restored._optimizer.yi == original._optimizer.yi


def test_restore_in_initial_phase(tmp_path):
    original = make_searcher(n_initial_points=6)
    drive(original, 0, 2)
    pending = [("p0", original.suggest("p0"))]

    restored = make_searcher(n_initial_points=6)
    restored.set_state(json.loads(json.dumps(original.get_state())))

    assert drive(restored, 2, 10, pending) == drive(original, 2, 10, pending)


def test_state_is_strict_json_after_nonfinite():
    searcher = make_searcher()
    searcher.suggest("t0")
    searcher.on_trial_result("t0", {"score": math.nan})
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"score": -1.0})

    text = json.dumps(searcher.get_state(), allow_nan=True)

    restored = make_searcher()
    restored.set_state(json.loads(text))
    assert restored.get_state()["pending"] == searcher.get_state()["pending"]


def test_state_of_other_space_rejected():
    state = make_searcher().get_state()
    other = make_searcher(load_space("table1").restrict({"loss": "ce"}))

    with pytest.raises(SpecError, match=r"saved searcher state .* does not match"):
        other.set_state(state)


def test_corrupt_state_file_rejected(tmp_path):
    path = tmp_path / "searcher.json"
    path.write_text("{not json")

    with pytest.raises(SpecError, match=r"searcher state .* could not be read"):
        make_searcher().restore(str(path))
