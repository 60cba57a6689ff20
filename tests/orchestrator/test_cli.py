"""Bad input through the ``hpo`` command: one line naming the value and the fix, exit code 2.

Every case must fail before any trial starts, so the tests also check that no Ray Tune
results and no MLflow runs were written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.plan import asha_epochs, hyperband_brackets, max_bracket

BASE_STUDY = {
    "name": "bad-input",
    "datasets": ["synthetic"],
    "models": ["mlp"],
    "losses": ["ce"],
    "training": {"epochs": 2},
    "tuning": {"num_samples": 2},
    "retrain": {"noise_levels": [0.0], "seeds": [0]},
}


def write(tmp_path: Path, study: dict) -> Path:
    study = {**study}
    study.setdefault("directory", str(tmp_path / "study"))
    study.setdefault("data", {"root": str(tmp_path / "data")})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def run_and_capture(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip()


def assert_one_line(stderr: str, *fragments: str) -> None:
    # Ray may print its own start-up warnings first; the service's error is one line, last.
    error_lines = [line for line in stderr.splitlines() if line.startswith("hpo ")]
    assert len(error_lines) == 1, stderr
    assert stderr.splitlines()[-1] == error_lines[0]
    assert " error: " in error_lines[0]
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, error_lines[0])


def assert_nothing_ran(tmp_path: Path) -> None:
    assert not (tmp_path / "study" / "ray_results").exists()
    database = tmp_path / "study" / "mlflow.db"
    if database.exists():
        client = MlflowClient(f"sqlite:///{database}")
        experiments = client.search_experiments()
        runs = client.search_runs([experiment.experiment_id for experiment in experiments])
        assert runs == []


BAD_STUDIES = [
    pytest.param({"trainig": {"epochs": 2}}, ("trainig", "did you mean 'training'"), id="unknown-key"),
    pytest.param({"training": {"epochs": "ten"}}, ("training.epochs", "'ten'"), id="wrong-type"),
    pytest.param({"datasets": ["imagenet"]}, ("imagenet", "fashion_mnist"), id="unknown-dataset"),
    pytest.param({"models": ["resnet50"]}, ("resnet50", "resnet18"), id="unknown-model"),
    pytest.param({"losses": ["focal"]}, ("focal", "ce"), id="unknown-loss"),
    pytest.param({"tuning": {"search": "hyperopt"}}, ("hyperopt", "bohb"), id="unknown-preset"),
    pytest.param({"retrain": {"noise_levels": [1.0], "seeds": [0]}}, ("1.0", "[0, 1)"), id="eta-one"),
    pytest.param({"retrain": {"noise_levels": [-0.1], "seeds": [0]}}, ("-0.1",), id="eta-negative"),
    pytest.param({"retrain": {"noise_levels": [], "seeds": [0]}}, ("noise_levels",), id="empty-noise"),
    pytest.param({"retrain": {"noise_levels": [0.1], "seeds": []}}, ("seeds",), id="empty-seeds"),
]


@pytest.mark.parametrize(("override", "fragments"), BAD_STUDIES)
def test_run_rejects_bad_study(tmp_path, capsys, override, fragments):
    path = write(tmp_path, {**BASE_STUDY, **override})
    code, error = run_and_capture(capsys, "run", str(path))
    assert code == 2
    assert_one_line(error, *fragments)
    assert_nothing_ran(tmp_path)


def test_run_rejects_unreachable_tracking(tmp_path, capsys):
    # Port 9 (discard) has no PostgreSQL server, so the connection is refused at once.
    uri = "postgresql+psycopg2://postgres@127.0.0.1:9/none"
    path = write(tmp_path, {**BASE_STUDY, "tracking": {"uri": uri}})
    code, error = run_and_capture(capsys, "run", str(path))
    assert code == 2
    assert_one_line(error, "127.0.0.1:9", "tracking.uri")
    assert_nothing_ran(tmp_path)


def test_run_rejects_missing_data(tmp_path, capsys):
    path = write(tmp_path, {**BASE_STUDY, "datasets": ["cifar10"]})
    code, error = run_and_capture(capsys, "run", str(path))
    assert code == 2
    assert_one_line(error, "cifar10", str(tmp_path / "data"), "data.download")
    assert_nothing_ran(tmp_path)


def test_run_rejects_infeasible_resources(tmp_path, capsys):
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        path = write(tmp_path, {**BASE_STUDY, "resources": {"cpus_per_trial": 1, "gpus_per_trial": 1}})
        code, error = run_and_capture(capsys, "run", str(path))
    finally:
        ray.shutdown()
    assert code == 2
    assert_one_line(error, "gpus_per_trial 1", "gpus_per_trial: 0")
    assert_nothing_ran(tmp_path)


def test_run_rejects_missing_study_file(tmp_path, capsys):
    code, error = run_and_capture(capsys, "run", str(tmp_path / "absent.yaml"))
    assert code == 2
    assert_one_line(error, "absent.yaml")


def test_plan_prints_brackets_and_epochs(tmp_path, capsys):
    path = write(tmp_path, {**BASE_STUDY, "training": {"epochs": 9}, "tuning": {"num_samples": 9, "max_epochs": 9}})
    assert main(["plan", str(path)]) == 0
    output = capsys.readouterr().out
    assert "bracket s=2" in output
    assert "epoch-equivalents" in output
    assert not (tmp_path / "study").exists()


def test_hyperband_brackets_follow_paper():
    # R = 9, eta = 3: s_max = 2; bracket sizes 9, 5 (ceil(3/2 * 3)), 3.
    assert max_bracket(9, 3) == 2
    assert max_bracket(2, 3) == 0
    brackets = hyperband_brackets(17, 9, 3)
    assert [bracket.trials for bracket in brackets] == [9, 5, 3]
    assert [(rung.trials, rung.epochs) for rung in brackets[0].rungs] == [(9, 1), (3, 3), (1, 9)]
    # 9 trials x 1 epoch, 3 more trials x 2 epochs, 1 more x 6 epochs.
    assert brackets[0].epochs == 9 + 6 + 6
    assert brackets[2].epochs == 27


def test_hyperband_brackets_partial_fill():
    brackets = hyperband_brackets(4, 9, 3)
    assert [bracket.trials for bracket in brackets] == [4]
    assert sum(bracket.trials for bracket in hyperband_brackets(40, 9, 3)) == 40


def test_asha_epochs_estimate():
    # 27 trials: all reach 1 epoch, 9 reach 3, 3 reach 9.
    assert asha_epochs(27, 9, 3) == 27 * 1 + 9 * 2 + 3 * 6
