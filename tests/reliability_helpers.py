"""Helpers of the reliability tests: tiny studies, `hpo` subprocesses, processes, injected faults.

Subprocess studies run ``python -m orchestrator.cli`` with a marker variable in their
environment and their own Ray temporary directory. Every process they start, Ray's
included, inherits the marker. So ``marked_processes`` finds exactly the processes of one
test, even after the driver was killed and its Ray processes were left behind. Other Ray
instances on the machine do not have the marker and are never touched.

The fault-injecting trial and retrain functions coordinate through files in a directory:
a role (flaky, broken) goes to the first piece of work that claims it with an exclusive
file creation, and every attempt appends a line to the work's attempt log.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
MARKER_VARIABLE = "HPO_TEST_MARKER"

TINY_STUDY: dict[str, Any] = {
    "datasets": ["synthetic"],
    "models": ["mlp"],
    "losses": ["ce"],
    "model_options": {"mlp": {"depth": 2, "width": 32}},
    "data": {"subset": 1500},
    "training": {"epochs": 3, "batch_size": 128},
    "tuning": {"search": "skopt", "num_samples": 4, "max_epochs": 3, "reduction_factor": 3},
    "retrain": {"noise_levels": [0.0], "seeds": [0]},
    "resources": {"cpus_per_trial": 1},
}


# Study files -------------------------------------------------------------------------------


def write_study(directory: Path, name: str, study_dir: Path | None = None, **overrides: Any) -> Path:
    """Write a tiny study file; ``overrides`` replace keys inside sections or whole values."""
    study = json.loads(json.dumps(TINY_STUDY))
    study["name"] = name
    study["directory"] = str(study_dir or directory / name)
    study["data"]["root"] = str(directory / "data")
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(study.get(section), dict):
            study[section].update(values)
        else:
            study[section] = values
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def sqlite_uri(study_dir: Path) -> str:
    return f"sqlite:///{study_dir}/mlflow.db"


def runs_by_phase(tracking_uri: str, experiment: str) -> dict[str, list]:
    """Return the active runs of an experiment grouped by their ``phase`` tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment} not found in {tracking_uri}"
    grouped: dict[str, list] = {}
    for run in client.search_runs([found.experiment_id], max_results=5000):
        grouped.setdefault(run.data.tags.get("phase"), []).append(run)
    return grouped


def ended_trials(runs: dict[str, list]) -> list:
    """Trial runs that ended (those with a ``trial_status`` tag)."""
    return [run for run in runs.get("tune", []) if "trial_status" in run.data.tags]


# Subprocesses -------------------------------------------------------------------------------


class StudyProcess:
    """One ``python -m orchestrator.cli`` process whose output goes to a log file."""

    def __init__(self, arguments: list[str], log_path: Path, environment: dict[str, str]):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *arguments],
            cwd=REPOSITORY, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=environment,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        """Wait until the log matches ``pattern``; fail with the log's tail otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.process.poll() is not None:
                raise AssertionError(f"hpo exited with {self.process.returncode} before {pattern!r}:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} not logged within {timeout_s:.0f} s:\n{self.tail()}")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"hpo did not exit within {timeout_s:.0f} s:\n{self.tail()}") from None
        finally:
            self.log.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


@contextmanager
def marked_session() -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (marker, environment) for subprocess studies; kill their processes afterwards.

    The environment has a fresh marker, its own short Ray temporary directory (Unix socket
    paths must stay under 108 bytes) and no Ray address, so ``ray.init`` starts a local
    instance and never joins another developer's cluster.
    """
    marker = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="hpo-rt-", dir="/tmp")
    environment = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS",)}
    environment.update({MARKER_VARIABLE: marker, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1",
                        "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        yield marker, environment
    finally:
        kill_marked(marker)
        subprocess.run(["rm", "-rf", ray_tmp], check=False)


def marked_processes(marker: str) -> list[int]:
    """Return the pids of running processes (not zombies) whose environment has the marker."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def kill_marked(marker: str, timeout_s: float = 10.0) -> int:
    """SIGKILL every process with the marker and wait until they are gone; return how many."""
    pids = marked_processes(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return len(pids)


def wait_until_gone(marker: str, timeout_s: float) -> list[int]:
    """Wait up to ``timeout_s`` for the marked processes to exit; return those still running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = marked_processes(marker)
        if not left:
            return []
        time.sleep(0.5)
    return marked_processes(marker)


def describe_processes(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            lines.append(f"{pid}: {command[:160]}")
        except OSError:
            lines.append(f"{pid}: (gone)")
    return "\n".join(lines)


# Injected faults -----------------------------------------------------------------------------


def claim(directory: str, role: str, owner: str) -> bool:
    """Give ``role`` to ``owner`` unless another owner has it; return whether ``owner`` has it."""
    path = Path(directory, f"role-{role}")
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return path.read_text().strip() == owner
    with os.fdopen(descriptor, "w") as handle:
        handle.write(owner)
    return True


def first_time(directory: str, event: str) -> bool:
    """Return True the first time ``event`` happens in ``directory``, False afterwards."""
    try:
        os.close(os.open(Path(directory, f"event-{event}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def holder(directory: str, role: str) -> str | None:
    """Return the owner of ``role``, or None."""
    path = Path(directory, f"role-{role}")
    return path.read_text().strip() if path.exists() else None


def log_attempt(directory: str, owner: str, start_epoch: int) -> int:
    """Append an attempt of ``owner`` that starts after ``start_epoch``; return its number."""
    path = Path(directory, f"attempts-{owner}")
    with open(path, "a") as handle:
        handle.write(f"{start_epoch}\n")
    return len(path.read_text().split())


def attempts(directory: str, owner: str) -> list[int]:
    """Return the start epoch of every attempt of ``owner``, in order."""
    path = Path(directory, f"attempts-{owner}")
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def faulty_trial_function(directory: str):
    """Return a trial function that injects two faults, like ``trainables.train.tune_trial``.

    - role ``broken``: the first trial to start raises at the start of every attempt;
    - role ``flaky``: the first other trial to begin its second epoch raises there, once,
      after its first epoch was reported with a checkpoint.
    Other trials train normally.
    """

    def faulty_trial(config, setup, data) -> None:
        import tempfile as temporary

        from ray import tune

        from trainables.train import Trainer, place_data, run_epoch, tuning_metrics

        trial_id = tune.get_context().get_trial_id()
        trainer = Trainer(setup, config)
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as checkpoint_dir:
                trainer.load(checkpoint_dir)
        log_attempt(directory, trial_id, trainer.epoch)
        if claim(directory, "broken", trial_id):
            raise RuntimeError("injected failure: this trial fails on every attempt")
        train, evaluation = place_data(trainer, data)
        while trainer.epoch < setup.epochs:
            if trainer.epoch == 1 and claim(directory, "flaky", trial_id) and first_time(directory, "flaky-raised"):
                raise RuntimeError("injected failure: this trial fails on its first attempt only")
            result = run_epoch(trainer, train, evaluation)
            with temporary.TemporaryDirectory() as checkpoint_dir:
                trainer.save(checkpoint_dir)
                tune.report(tuning_metrics(result), checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    return faulty_trial


def faulty_retrain_function(directory: str, lost_worker: tuple[float, int], broken: tuple[float, int]):
    """Return a retrain function that injects two faults into ``trainables.train.retrain``.

    - ``lost_worker`` (eta, seed): the worker process kills itself after its first epoch
      was saved, on the first attempt only;
    - ``broken`` (eta, seed): raises at the start of every attempt.
    """

    def faulty_retrain(setup, hyperparameters, data, *, eta, seed, checkpoint_dir=None, **options):
        from trainables.train import CHECKPOINT_FILE, retrain

        owner = f"eta{eta:g}-seed{seed}"
        saved = checkpoint_dir is not None and os.path.exists(os.path.join(checkpoint_dir, CHECKPOINT_FILE))
        number = log_attempt(directory, owner, 1 if saved else 0)
        if (eta, seed) == broken:
            raise ValueError("injected failure: this retrain fails on every attempt")

        def on_epoch(result) -> None:
            if (eta, seed) == lost_worker and number == 1 and result.epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        return retrain(setup, hyperparameters, data, eta=eta, seed=seed, checkpoint_dir=checkpoint_dir,
                       on_epoch=on_epoch, **options)

    return faulty_retrain
