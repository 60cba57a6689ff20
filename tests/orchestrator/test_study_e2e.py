"""End to end: a tiny study on a local Ray cluster, checked from MLflow alone.

The study runs on synthetic data (2 cells, 4 trials each, 2 noise levels, 2 seeds) against
the embedded SQLite store and against this machine's PostgreSQL server.
"""

from __future__ import annotations

import json
import math
import statistics
import uuid
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from tests.postgres import postgres_database

TINY_STUDY = {
    "datasets": ["synthetic"],
    "models": ["mlp"],
    "losses": ["ce", "ls"],
    "model_options": {"mlp": {"depth": 2, "width": 32}},
    "data": {"subset": 1500},
    "training": {"epochs": 3, "batch_size": 128},
    "tuning": {"search": "bohb", "num_samples": 4, "max_epochs": 3, "reduction_factor": 3},
    "retrain": {"noise_levels": [0.0, 0.2], "seeds": [0, 1]},
    "resources": {"cpus_per_trial": 1},
}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_study(directory: Path, name: str, tracking_uri: str | None = None, **overrides) -> Path:
    study = json.loads(json.dumps(TINY_STUDY))
    study["name"] = name
    study["directory"] = str(directory / "study")
    study["data"]["root"] = str(directory / "data")
    if tracking_uri is not None:
        study["tracking"] = {"uri": tracking_uri}
    for section, values in overrides.items():
        study.setdefault(section, {}).update(values)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def runs_by_phase(client: MlflowClient, experiment_id: str) -> dict[str, list]:
    runs = client.search_runs([experiment_id], max_results=5000)
    grouped: dict[str, list] = {}
    for run in runs:
        grouped.setdefault(run.data.tags.get("phase"), []).append(run)
    return grouped


def check_study_record(tracking_uri: str, name: str, study_dir: Path) -> None:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = runs_by_phase(client, experiment.experiment_id)

    # Hierarchy: one study run, two cells under it, trials and retrains under the cells.
    assert len(runs["study"]) == 1
    study_run = runs["study"][0]
    assert len(runs["cell"]) == 2
    cell_ids = {run.info.run_id for run in runs["cell"]}
    for cell in runs["cell"]:
        assert cell.data.tags["mlflow.parentRunId"] == study_run.info.run_id
    assert len(runs["tune"]) == 2 * 4
    assert len(runs["retrain"]) == 2 * 2 * 2
    for run in runs["tune"] + runs["retrain"]:
        assert run.data.tags["mlflow.parentRunId"] in cell_ids
        assert run.data.tags["study"] == name
    trial_ids = [run.data.tags["trial_id"] for run in runs["tune"]]
    assert len(set(trial_ids)) == len(trial_ids)
    keys = {(run.data.tags["loss"], run.data.tags["eta"], run.data.tags["seed"]) for run in runs["retrain"]}
    assert len(keys) == 8

    # No run left RUNNING.
    for phase_runs in runs.values():
        for run in phase_runs:
            assert run.info.status == "FINISHED", (run.data.tags, run.info.status)

    # Metric steps equal epochs: each trial logs val_accuracy at steps 1..budget.
    for run in runs["tune"]:
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        steps = sorted(metric.step for metric in history)
        budget = int(run.data.metrics["budget"])
        assert steps == list(range(1, budget + 1))
    for run in runs["retrain"]:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(metric.step for metric in history) == [1, 2, 3]
        assert len(run.data.tags.get("noise_sha256", run.data.params.get("noise_sha256", ""))) == 64

    # The exported table equals one computed by hand from the logged retrain accuracies.
    exported = json.loads((study_dir / "export" / "table2.json").read_text())
    records = exported if isinstance(exported, list) else exported["records"]
    assert len(records) == 4
    for record in records:
        values = [
            run.data.metrics["test_accuracy"] * 100
            for run in runs["retrain"]
            if run.data.tags["loss"] == record["loss"] and float(run.data.tags["eta"]) == float(record["eta"])
        ]
        assert len(values) == 2
        assert record["mean"] == pytest.approx(statistics.mean(values), abs=1e-6)
        assert record["std"] == pytest.approx(statistics.stdev(values), abs=1e-6)
    markdown = (study_dir / "export" / "table2.md").read_text()
    assert "±" in markdown

    # Artifacts of the study run include the table.
    artifacts = {item.path for item in client.list_artifacts(study_run.info.run_id, "table2")}
    assert "table2/table2.md" in artifacts


def assert_no_stray_mlruns(*roots: Path) -> None:
    for root in roots:
        assert not list(root.rglob("mlruns")), f"stray mlruns folder under {root}"


def test_tiny_study_sqlite(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    study_path = write_study(tmp_path, name)
    assert main(["run", str(study_path)]) == 0
    study_dir = tmp_path / "study"
    check_study_record(f"sqlite:///{study_dir}/mlflow.db", name, study_dir)
    assert_no_stray_mlruns(tmp_path, Path.cwd(), Path(__file__).resolve().parents[2])

    # Exporting again from an explicit tracking URI gives the same table.
    out_dir = tmp_path / "again"
    uri = f"sqlite:///{study_dir}/mlflow.db"
    assert main(["export", str(study_path), "--tracking-uri", uri, "--out", str(out_dir), "--compare-paper"]) == 0
    assert (out_dir / "table2.json").read_text() == (study_dir / "export" / "table2.json").read_text()


def test_tiny_study_postgresql(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with postgres_database() as uri:
        name = f"tiny-{uuid.uuid4().hex[:6]}"
        study_path = write_study(tmp_path, name, tracking_uri=uri)
        assert main(["run", str(study_path)]) == 0
        study_dir = tmp_path / "study"
        check_study_record(uri, name, study_dir)
    assert_no_stray_mlruns(tmp_path, Path(__file__).resolve().parents[2])


def test_second_run_refused_then_resume_skips(local_ray, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    study_path = write_study(tmp_path, name, tuning={"num_samples": 2}, retrain={"noise_levels": [0.0], "seeds": [0]})
    assert main(["run", str(study_path)]) == 0
    capsys.readouterr()

    assert main(["run", str(study_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"'hpo run {study_path} --resume'" in error

    # The driver of a submitted job names the command its user runs on the workstation.
    with monkeypatch.context() as job:
        job.setenv("HPO_RAY_JOB_ID", "hpo-tiny-1")
        assert main(["run", str(study_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"'hpo submit {study_path} --resume'" in error

    assert main(["run", str(study_path), "--resume"]) == 0
    output = capsys.readouterr().out
    assert "already finished" in output
    client = MlflowClient(f"sqlite:///{tmp_path}/study/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    retrains = client.search_runs([experiment.experiment_id], "tags.phase = 'retrain'")
    assert len(retrains) == 2
    assert all(math.isfinite(run.data.metrics["test_accuracy"]) for run in retrains)
