"""Reliability of the study pipeline under injected faults, with real processes.

Each test runs a tiny synthetic study and injects one kind of fault. The faults are a
killed driver (SIGKILL) during tuning and during retraining, SIGTERM, trials and retrains
that raise or lose their worker process, and an MLflow server on PostgreSQL that goes
away for 30 seconds. Each test then checks from MLflow alone that nothing was lost or
duplicated. The
worker-node test of a two-node cluster is in ``test_reliability_cluster.py``.

Subprocess studies are found and cleaned up by a marker in their environment (see
``tests.reliability_helpers``), never by a global ``ray stop``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest
import ray
from mlflow.tracking import MlflowClient

import tests.reliability_helpers as helpers
from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.reliability import (
    DEFAULT_OUTAGE_LIMIT_S,
    OUTAGE_LIMIT_ENV,
    FailureHistory,
    RetryPolicy,
    StopSignals,
    StudyInterrupted,
    TrackingJournal,
    TrackingUnavailableError,
    describe_failure,
    interruptible_sleep,
    is_transient_tracking_error,
    outage_limit_from_environment,
    stop_requested,
)
from orchestrator.preflight import open_tracking
from orchestrator.spec import load_study, parse_study
from orchestrator.study import run_study
from orchestrator.tracking import Tracker
from tests.postgres import postgres_database
from tests.reliability_helpers import (
    StudyProcess,
    attempts,
    describe_processes,
    ended_trials,
    holder,
    marked_processes,
    marked_session,
    runs_by_phase,
    sqlite_uri,
    wait_until_gone,
    write_study,
)

# Ray workers must unpickle the fault-injecting functions without importing tests/.
cloudpickle.register_pickle_by_value(helpers)

PROCESS_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def local_ray():
    # address="local" starts a new instance even where another cluster was started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def assert_nothing_running(runs: dict[str, list]) -> None:
    running = [(phase, run.info.run_id) for phase, items in runs.items() for run in items
               if run.info.status == "RUNNING"]
    assert running == []


def assert_complete_curves(tracking_uri: str, trial_runs: list) -> None:
    """Every ended trial logged val_accuracy at each epoch 1..budget exactly once."""
    client = MlflowClient(tracking_uri)
    for run in trial_runs:
        steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "val_accuracy"))
        budget = int(run.data.metrics.get("budget", 0))
        assert steps == list(range(1, budget + 1)), (run.data.tags["trial_id"], steps)


def retrain_keys(runs: dict[str, list], status: str = "FINISHED") -> list[tuple[str, str, str]]:
    return sorted((run.data.tags["loss"], run.data.tags["eta"], run.data.tags["seed"])
                  for run in runs.get("retrain", []) if run.info.status == status)


def table(study_dir: Path) -> list[dict]:
    exported = json.loads((study_dir / "export" / "table2.json").read_text())
    records = exported if isinstance(exported, list) else exported["records"]
    return sorted(records, key=lambda record: (record["loss"], float(record["eta"])))


# Failure classification, retry policy, stop signals -------------------------------------------


def test_same_exception_twice_is_deterministic():
    history = FailureHistory()
    first = describe_failure(ValueError("bad value"))
    assert first.kind == "exception"
    assert not history.record("a", first)
    assert history.record("a", describe_failure(ValueError("bad value")))
    assert history.retries("a") == 2


def test_different_exceptions_are_retried():
    history = FailureHistory()
    assert not history.record("a", describe_failure(ValueError("one")))
    assert not history.record("a", describe_failure(ValueError("two")))
    assert not history.record("b", describe_failure(ValueError("one")))


def test_lost_workers_never_deterministic():
    history = FailureHistory()
    crash = describe_failure(ray.exceptions.WorkerCrashedError())
    assert crash.kind == "lost_worker"
    assert not history.record("a", crash)
    assert not history.record("a", describe_failure(ray.exceptions.WorkerCrashedError()))


def test_task_error_signature_ignores_process():
    def failing():
        raise RuntimeError("injected")

    errors = []
    for pid in (101, 202):
        try:
            failing()
        except RuntimeError as cause:
            errors.append(ray.exceptions.RayTaskError("train", f"Traceback (pid={pid})", cause))
    first, second = (describe_failure(error) for error in errors)
    assert first.signature == second.signature == "RuntimeError: injected"


def test_retry_policy_backs_off_to_its_cap():
    policy = RetryPolicy(limit_s=60, first_delay_s=1, max_delay_s=8)
    assert [policy.delay(failures) for failures in range(1, 6)] == [1, 2, 4, 8, 8]


@pytest.mark.parametrize("text", ["soon", "0", "-5"])
def test_outage_limit_rejects_bad_value(text):
    with pytest.raises(SpecError) as raised:
        outage_limit_from_environment({OUTAGE_LIMIT_ENV: text})
    message = str(raised.value)
    assert OUTAGE_LIMIT_ENV in message
    assert repr(text) in message
    assert len(message.splitlines()) == 1


def test_outage_limit_default_and_value():
    assert outage_limit_from_environment({}) == DEFAULT_OUTAGE_LIMIT_S
    assert outage_limit_from_environment({OUTAGE_LIMIT_ENV: "45"}) == 45.0


@pytest.mark.parametrize("in_file, in_environment, expected", [
    (None, None, DEFAULT_OUTAGE_LIMIT_S),
    (None, "45", 45.0),
    (30, "45", 30.0),
    (30, None, 30.0),
])
def test_tracker_outage_limit_sources(tmp_path, monkeypatch, in_file, in_environment, expected):
    if in_environment is None:
        monkeypatch.delenv(OUTAGE_LIMIT_ENV, raising=False)
    else:
        monkeypatch.setenv(OUTAGE_LIMIT_ENV, in_environment)
    spec = parse_study({
        "name": "limits", "directory": str(tmp_path / "study"),
        "tracking": {"outage_limit_s": in_file},
    })
    tracker = open_tracking(spec)
    try:
        assert tracker.policy.limit_s == expected
    finally:
        tracker.close()


def test_transient_tracking_errors():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    assert is_transient_tracking_error(MlflowException("server down", error_code=INTERNAL_ERROR))
    assert is_transient_tracking_error(ConnectionRefusedError())
    assert not is_transient_tracking_error(MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient_tracking_error(ValueError("bug"))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_requests_then_forces(signum, code):
    before = signal.getsignal(signum)
    with StopSignals():
        # The first signal is a request, raised at the next safe point.
        os.kill(os.getpid(), signum)
        assert stop_requested() == signum
        with pytest.raises(StudyInterrupted) as raised:
            interruptible_sleep(5)
        assert raised.value.exit_code == code
        # A second signal raises at once.
        with pytest.raises(StudyInterrupted):
            os.kill(os.getpid(), signum)
            time.sleep(5)
    assert signal.getsignal(signum) is before
    assert stop_requested() is None


# Tracking writes while the store is unreachable ----------------------------------------------


def unreachable_client():
    """An MLflow client for a port where nothing listens: a real, unreachable store."""
    return MlflowClient(f"http://127.0.0.1:{free_port()}")


def test_journal_keeps_writes_and_resume_delivers_them(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    journal = tmp_path / "journal.jsonl"
    tracker = Tracker(uri, "journal", "journal", tmp_path / "artifacts",
                      retry_policy=RetryPolicy(limit_s=2, first_delay_s=0.2, max_delay_s=0.5))
    tracker.enable_journal(journal)
    study_run = tracker.start_run("study", {"phase": "study"})
    store = tracker.client

    # The store goes away: writes return at once, wait in the journal, and nothing is lost.
    tracker.client = unreachable_client()
    started = time.monotonic()
    cell = tracker.start_run("cell", {"phase": "cell"}, parent_id=study_run)
    assert cell.startswith("pending:")
    for epoch in range(1, 4):
        tracker.log_metrics(cell, {"val_accuracy": epoch / 10}, step=epoch)
    tracker.set_tags(cell, {"trial_status": "finished"})
    tracker.end_run(cell, "FINISHED")
    assert time.monotonic() - started < 2
    assert tracker.pending_writes() == 6
    assert len(journal.read_text().splitlines()) == 6

    # Past the limit the tracker reports the outage instead of waiting for ever.
    time.sleep(2.1)
    tracker.log_metrics(cell, {"budget": 3}, step=3)
    assert tracker.outage_exceeded()
    with pytest.raises(TrackingUnavailableError) as raised:
        tracker.flush()
    assert str(journal) in str(raised.value)
    assert "tracking.outage_limit_s" in str(raised.value)
    tracker.close()
    assert len(journal.read_text().splitlines()) == 7
    assert store.search_runs([tracker.experiment_id], "tags.phase = 'cell'") == []

    # A resumed study delivers the journal; delivering it twice changes nothing.
    saved = journal.read_text()
    for _ in range(2):
        journal.write_text(saved)
        resumed = Tracker(uri, "journal", "journal", tmp_path / "artifacts")
        assert resumed.enable_journal(journal) == 7
        assert not journal.exists()
    cells = store.search_runs([tracker.experiment_id], "tags.phase = 'cell'")
    assert len(cells) == 1
    assert cells[0].info.status == "FINISHED"
    assert cells[0].data.tags["mlflow.parentRunId"] == study_run
    assert cells[0].data.tags["trial_status"] == "finished"
    history = store.get_metric_history(cells[0].info.run_id, "val_accuracy")
    assert sorted((metric.step, metric.value) for metric in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert cells[0].data.metrics["budget"] == 3


def test_journal_skips_line_cut_short(tmp_path):
    journal = TrackingJournal(tmp_path / "journal.jsonl")
    journal.append([{"op": "terminate", "run": "abc", "status": "FINISHED"}])
    with open(journal.path, "a") as handle:
        handle.write('{"op": "log_ba')
    assert journal.load() == [{"op": "terminate", "run": "abc", "status": "FINISHED"}]


# Injected trial and retrain failures ---------------------------------------------------------


def test_failed_trials_and_retrains_retried_or_reported(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    faults = tmp_path / "faults"
    faults.mkdir()
    name = unique("faults")
    study_path = write_study(tmp_path, name, retries={"max_failures": 3},
                             tuning={"num_samples": 3}, retrain={"noise_levels": [0.0], "seeds": [0, 1, 2]})
    summary = run_study(
        load_study(study_path),
        trial_function=helpers.faulty_trial_function(str(faults)),
        retrain_function=helpers.faulty_retrain_function(str(faults), lost_worker=(0.0, 0), broken=(0.0, 1)),
    )
    study_dir = tmp_path / name
    runs = runs_by_phase(sqlite_uri(study_dir), name)
    trials = {run.data.tags["trial_id"]: run for run in runs["tune"]}

    # The trial that always raises: two attempts, then reported and left out of selection.
    broken = holder(str(faults), "broken")
    assert broken in trials
    assert len(attempts(str(faults), broken)) == 2
    assert trials[broken].info.status == "FAILED"
    assert trials[broken].data.tags["trial_status"] == "error"
    assert trials[broken].data.tags["retries"] == "1"
    assert "injected failure: this trial fails on every attempt" in trials[broken].data.tags["error"]
    assert runs["cell"][0].data.tags["winner_trial_id"] != broken

    # The trial that raised once: retried from its epoch-1 checkpoint and finished.
    flaky = holder(str(faults), "flaky")
    assert flaky in trials
    assert flaky != broken
    assert trials[flaky].info.status == "FINISHED"
    assert trials[flaky].data.tags["retries"] == "1"
    assert 1 in attempts(str(faults), flaky)[1:]
    assert_complete_curves(sqlite_uri(study_dir), ended_trials(runs))
    assert len(ended_trials(runs)) == 3

    # The retrain whose worker died continued from its checkpoint; the broken one is reported.
    assert attempts(str(faults), "eta0-seed0") == [0, 1]
    assert len(attempts(str(faults), "eta0-seed1")) == 2
    assert retrain_keys(runs) == [("ce", "0.0", "0"), ("ce", "0.0", "2")]
    assert retrain_keys(runs, "FAILED") == [("ce", "0.0", "1")]
    by_key = {(run.data.tags["eta"], run.data.tags["seed"]): run for run in runs["retrain"]}
    assert by_key[("0.0", "0")].data.tags["retries"] == "1"
    assert "injected failure: this retrain fails on every attempt" in by_key[("0.0", "1")].data.tags["error"]
    client = MlflowClient(sqlite_uri(study_dir))
    steps = sorted(metric.step for metric in client.get_metric_history(by_key[("0.0", "0")].info.run_id, "train_loss"))
    assert steps == [1, 2, 3]

    # The summary counts the retries and names what could not be produced.
    cell = summary.cells[0]
    assert cell.trials.get("error") == 1
    assert cell.trials_retried == 2
    assert cell.retrains_retried == 2
    assert len(cell.retrain_failures) == 1
    text = summary.format()
    assert f"could not produce: trial {broken}: " in text
    assert "could not produce: synthetic/mlp/ce eta=0 seed=1: " in text
    assert "1 failed, 2 retried" in text
    assert_nothing_running(runs)
    print(f"injected faults: trial attempts broken {attempts(str(faults), broken)}, "
          f"flaky {attempts(str(faults), flaky)}; retrain attempts lost worker "
          f"{attempts(str(faults), 'eta0-seed0')}, broken {attempts(str(faults), 'eta0-seed1')}")


# A killed driver -----------------------------------------------------------------------------


def test_sigkill_during_tuning_then_resume(tmp_path):
    name = unique("kill-tune")
    study_path = write_study(tmp_path, name)
    study_dir = tmp_path / name
    uri = sqlite_uri(study_dir)
    with marked_session() as (marker, environment):
        # Kill the driver once a trial has ended and others are still running.
        first = StudyProcess(["run", str(study_path)], tmp_path / "first.log", environment)
        first.wait_for(r"1/4 trials finished", PROCESS_TIMEOUT_S)
        first.process.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        runs = runs_by_phase(uri, name)
        before = {run.data.tags["trial_id"]: run for run in ended_trials(runs)}
        assert 1 <= len(before) < 4

        # Resume from the study directory, beside the Ray processes the killed driver left.
        second = StudyProcess(["resume", str(study_dir)], tmp_path / "second.log", environment)
        assert second.wait(PROCESS_TIMEOUT_S) == 0, second.tail()
        assert f"{len(before)} from the interrupted run" in second.output()

    runs = runs_by_phase(uri, name)
    ended = ended_trials(runs)
    trial_ids = [run.data.tags["trial_id"] for run in ended]
    assert len(ended) == 4
    assert len(set(trial_ids)) == 4
    # The trials that had ended keep their runs, and none of their configs ran again.
    after = {run.data.tags["trial_id"]: run for run in ended}
    for trial_id, run in before.items():
        assert after[trial_id].info.run_id == run.info.run_id
        assert after[trial_id].info.status == run.info.status
    configs = [run.data.tags["trial_config"] for run in runs["tune"]]
    for run in before.values():
        assert configs.count(run.data.tags["trial_config"]) == 1
    assert_complete_curves(uri, ended)

    # The cell is filled: one cell run with a winner, one retrain, nothing left RUNNING.
    assert len(runs["cell"]) == 1
    assert runs["cell"][0].info.status == "FINISHED"
    assert runs["cell"][0].data.tags["winner_trial_id"] in after
    assert retrain_keys(runs) == [("ce", "0.0", "0")]
    assert len(runs["retrain"]) == 1
    assert [run.info.status for run in runs["study"]] == ["FINISHED"]
    assert_nothing_running(runs)
    interrupted = [run for run in runs["tune"] if "trial_status" not in run.data.tags]
    print(f"SIGKILL during tuning: {len(before)} of 4 trials kept, {4 - len(before)} run after the resume, "
          f"{len(interrupted)} interrupted trial runs closed as FAILED")


def retrain_study(directory: Path, name: str) -> Path:
    """A study whose tuning is one trial of one epoch and whose retrains take a few seconds each."""
    return write_study(
        directory, name,
        model_options={"mlp": {"depth": 3, "width": 1024}},
        data={"subset": None},
        training={"epochs": 6, "batch_size": 128},
        tuning={"search": "random", "num_samples": 1, "max_epochs": 1, "min_trials_at_budget": 1},
        retrain={"noise_levels": [0.0, 0.2], "seeds": [0, 1]},
    )


def checkpointed_epochs(study_dir: Path) -> dict[str, int]:
    """Return the epoch of every retrain checkpoint under the study's storage, by directory name."""
    import torch

    epochs = {}
    for path in (study_dir / "ray_results" / "retrain").glob("*/*/trainer.pt"):
        try:
            epochs[path.parent.name] = int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
        except Exception:  # a file being replaced right now
            continue
    return epochs


def test_sigkill_during_retraining_matches_uninterrupted(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The uninterrupted reference (same spec, another name and directory) runs in this
    # process, beside the interrupted study.
    reference = unique("reference")
    reference_path = retrain_study(tmp_path, reference)
    reference_codes: list[int] = []
    reference_thread = threading.Thread(target=lambda: reference_codes.append(main(["run", str(reference_path)])))
    reference_thread.start()

    name = unique("kill-retrain")
    study_path = retrain_study(tmp_path, name)
    study_dir = tmp_path / name
    uri = sqlite_uri(study_dir)
    with marked_session() as (marker, environment):
        # Kill the driver once a retrain is logged and another one is part-way through.
        first = StudyProcess(["run", str(study_path)], tmp_path / "first.log", environment)
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while True:
            done = set(re_findall(r"retrain eta=(\S+) seed=(\d+) done", first.output()))
            partial = {key: epoch for key, epoch in checkpointed_epochs(study_dir).items()
                       if 1 <= epoch < 6 and not any(key.startswith(f"eta{eta}-seed{seed}-") for eta, seed in done)}
            if done and partial:
                break
            assert first.process.poll() is None, first.tail()
            assert time.monotonic() < deadline, first.tail()
            time.sleep(0.1)
        first.process.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        runs = runs_by_phase(uri, name)
        before = {(run.data.tags["eta"], run.data.tags["seed"]): run for run in runs.get("retrain", [])
                  if run.info.status == "FINISHED"}
        assert 1 <= len(before) < 4

        second = StudyProcess(["run", str(study_path), "--resume"], tmp_path / "second.log", environment)
        assert second.wait(PROCESS_TIMEOUT_S) == 0, second.tail()
        assert f"{len(before)} reused" in second.output()

    # Finished retrains keep their runs and values; no retrain run is duplicated.
    runs = runs_by_phase(uri, name)
    assert retrain_keys(runs) == [("ce", "0.0", "0"), ("ce", "0.0", "1"), ("ce", "0.2", "0"), ("ce", "0.2", "1")]
    assert len(runs["retrain"]) == 4
    after = {(run.data.tags["eta"], run.data.tags["seed"]): run for run in runs["retrain"]}
    for key, run in before.items():
        assert after[key].info.run_id == run.info.run_id
        assert after[key].data.metrics["test_accuracy"] == run.data.metrics["test_accuracy"]
    client = MlflowClient(uri)
    for run in runs["retrain"]:
        steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "train_loss"))
        assert steps == [1, 2, 3, 4, 5, 6]
    assert_nothing_running(runs)

    # The exported table equals the uninterrupted run's.
    reference_thread.join(timeout=PROCESS_TIMEOUT_S)
    assert reference_codes == [0]
    interrupted, uninterrupted = table(study_dir), table(tmp_path / reference)
    assert len(interrupted) == 2
    for got, expected in zip(interrupted, uninterrupted):
        assert (got["loss"], float(got["eta"])) == (expected["loss"], float(expected["eta"]))
        assert got["mean"] == pytest.approx(expected["mean"], abs=1e-9)
        assert got["std"] == pytest.approx(expected["std"], abs=1e-9)
    print(f"SIGKILL during retraining: {len(before)} of 4 retrains kept, checkpoints {partial} continued, "
          "table equal to the uninterrupted run's")


def re_findall(pattern: str, text: str) -> list:
    import re

    return re.findall(pattern, text)


# SIGTERM --------------------------------------------------------------------------------------


def unfinished_trial_runs(study_dir: Path) -> int:
    """Count trial runs without an outcome, read from the study's SQLite store without locking it."""
    database = study_dir / "mlflow.db"
    if not database.exists():
        return 0
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)
    try:
        return connection.execute(
            "SELECT COUNT(*) FROM tags AS phase WHERE phase.key = 'phase' AND phase.value = 'tune' "
            "AND NOT EXISTS (SELECT 1 FROM tags AS outcome WHERE outcome.run_uuid = phase.run_uuid "
            "AND outcome.key = 'trial_status')"
        ).fetchone()[0]
    except sqlite3.OperationalError:  # the schema is still being created
        return 0
    finally:
        connection.close()


def test_sigterm_stops_cleanly(tmp_path):
    name = unique("sigterm")
    # Trials of several seconds, so that some are part-way when the signal arrives.
    study_path = write_study(tmp_path, name, model_options={"mlp": {"depth": 3, "width": 1024}},
                             data={"subset": None})
    study_dir = tmp_path / name
    with marked_session() as (marker, environment):
        # Stop the study once a trial has reported an epoch and not ended.
        process = StudyProcess(["run", str(study_path)], tmp_path / "run.log", environment)
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while unfinished_trial_runs(study_dir) == 0:
            assert process.process.poll() is None, process.tail()
            assert time.monotonic() < deadline, process.tail()
            time.sleep(0.2)
        started = marked_processes(marker)
        assert len(started) >= 4, describe_processes(started)

        process.process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 143, process.tail()
        left = wait_until_gone(marker, 30)
        assert left == [], describe_processes(left)
        output = process.output()
        assert f"hpo run {study_path} --resume" in output
        assert f"hpo resume {study_dir}" in output

    runs = runs_by_phase(sqlite_uri(study_dir), name)
    assert_nothing_running(runs)
    assert runs["study"][0].info.status == "KILLED"
    assert runs["cell"][0].info.status == "KILLED"
    unfinished = [run for run in runs["tune"] if "trial_status" not in run.data.tags]
    assert unfinished
    assert all(run.info.status == "KILLED" for run in unfinished)
    print(f"SIGTERM: {len(started)} processes before, none left; {len(unfinished)} trial runs KILLED")


# Tracking store outage -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a PostgreSQL database, in its own process group."""

    def __init__(self, backend_uri: str, directory: Path):
        self.backend_uri = backend_uri
        self.directory = directory
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> None:
        log = open(self.directory / "mlflow-server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--artifacts-destination", str(self.directory / "artifacts")],
            cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.directory / "mlflow-server.log").read_text()[-2000:]
            try:
                import urllib.request

                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            import os

            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def test_tracking_server_outage_loses_nothing(local_ray, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(OUTAGE_LIMIT_ENV, "240")
    caplog.set_level(logging.WARNING, logger="orchestrator.tracking")
    with postgres_database() as backend_uri:
        server = MlflowServer(backend_uri, tmp_path)
        server.start()
        try:
            name = unique("outage")
            study_path = write_study(tmp_path, name, tracking={"uri": server.uri},
                                     retrain={"noise_levels": [0.0, 0.2], "seeds": [0]})
            outage: dict[str, float] = {}

            def interrupt_server() -> None:
                # Stop the server for 30 seconds once the study run exists.
                client = MlflowClient(server.uri)
                while "stopped" not in outage:
                    try:
                        experiment = client.get_experiment_by_name(name)
                        if experiment and client.search_runs([experiment.experiment_id], "tags.phase = 'study'"):
                            server.stop()
                            outage["stopped"] = time.monotonic()
                    except Exception:  # the study has not created its experiment yet
                        pass
                    time.sleep(0.2)
                time.sleep(30)
                server.start()
                outage["restarted"] = time.monotonic()

            controller = threading.Thread(target=interrupt_server, daemon=True)
            controller.start()
            assert main(["run", str(study_path)]) == 0
            finished = time.monotonic()
            controller.join(timeout=180)
            assert "restarted" in outage
            assert outage["stopped"] < finished

            # Every result reached MLflow: trials with full curves, retrains, the table.
            runs = runs_by_phase(server.uri, name)
            assert_nothing_running(runs)
            assert len(runs["study"]) == 1
            assert runs["study"][0].info.status == "FINISHED"
            assert len(runs["cell"]) == 1
            assert runs["cell"][0].info.status == "FINISHED"
            assert len(runs["tune"]) == 4
            assert len(ended_trials(runs)) == 4
            assert_complete_curves(server.uri, runs["tune"])
            assert retrain_keys(runs) == [("ce", "0.0", "0"), ("ce", "0.2", "0")]
            for run in runs["retrain"]:
                assert math.isfinite(run.data.metrics["test_accuracy"])
            client = MlflowClient(server.uri)
            artifacts = {item.path for item in client.list_artifacts(runs["study"][0].info.run_id, "table2")}
            assert "table2/table2.md" in artifacts
            assert not (tmp_path / name / "tracking-journal.jsonl").exists()
            messages = [record.getMessage() for record in caplog.records]
            assert any("unreachable" in message for message in messages)
            delivered = [message for message in messages if "reachable again" in message]
            assert delivered
            print(f"outage of {outage['restarted'] - outage['stopped']:.0f} s: {delivered[-1]}")
        finally:
            server.stop()
