"""Fault handling shared by the study pipeline: failures, retries, outages and stop signals.

- ``describe_failure`` turns what Ray raised for a trial or a retrain into a ``Failure``:
  an exception of the training code, or a lost worker process or node. ``FailureHistory``
  separates a deterministic failure (the same exception twice in a row) from one worth
  retrying.
- ``RetryPolicy`` is the exponential backoff used while the tracking store is unreachable,
  and ``is_transient_tracking_error`` decides which MLflow errors are worth a retry.
- ``TrackingJournal`` keeps MLflow writes that could not be delivered on disk, so that a
  later ``--resume`` delivers them.
- ``StopSignals`` turns SIGINT and SIGTERM into ``StudyInterrupted``, so that a stopped
  study marks its runs KILLED and shuts down the Ray instance it started.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from orchestrator.errors import RunFailedError

logger = logging.getLogger(__name__)

# Seconds the driver keeps retrying an unreachable tracking store before the study stops,
# when the study file leaves ``tracking.outage_limit_s`` unset.
OUTAGE_LIMIT_ENV = "HPO_TRACKING_OUTAGE_LIMIT_S"
DEFAULT_OUTAGE_LIMIT_S = 600.0

# Key that the driver adds to the config of a trial that failed deterministically. The
# next attempt of the trial then raises at once instead of training again.
ABORT_KEY = "__hpo_abort__"

# Kinds of failure: an exception raised by the training code, or a worker process or node
# that went away. Only exceptions can be deterministic.
FAILURE_EXCEPTION = "exception"
FAILURE_LOST_WORKER = "lost_worker"

# MLflow error codes that mean "try again later" rather than "this request is wrong".
# A refused connection arrives as INTERNAL_ERROR from the REST client.
TRANSIENT_MLFLOW_CODES = frozenset({
    "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
    "ABORTED", "UNAVAILABLE",
})

MAX_ERROR_LENGTH = 4000


# --- Failures of trials and retrains ------------------------------------------------------


class DeterministicFailure(RuntimeError):
    """Raised by a trial attempt that the driver cancelled because its error repeats."""


@dataclass(frozen=True)
class Failure:
    """One failed attempt: its kind, a signature to compare attempts, and a one-line message.

    ``signature`` is the exception type and message without process ids or addresses, so
    two attempts that hit the same bug have the same signature.
    """

    kind: str
    signature: str
    message: str

    @property
    def deterministic_candidate(self) -> bool:
        """Whether a repeat of this failure means the work cannot succeed."""
        return self.kind == FAILURE_EXCEPTION


def describe_failure(error: BaseException | None) -> Failure:
    """Classify what Ray raised for a failed task or actor (or the exception itself).

    ``RayTaskError`` wraps an exception of the training code; its cause gives the
    signature. Lost workers, lost nodes and lost objects are ``FAILURE_LOST_WORKER``.
    """
    import ray.exceptions

    if error is None:
        return Failure(FAILURE_LOST_WORKER, "unknown", "unknown error (no error was recorded)")
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        if isinstance(cause, ray.exceptions.RayError) and not isinstance(cause, ray.exceptions.RayTaskError):
            return describe_failure(cause)
        if cause is not None and not isinstance(cause, ray.exceptions.RayError):
            return _exception_failure(cause)
        text = _last_line(str(error))
        return Failure(FAILURE_EXCEPTION, text, text)
    if isinstance(error, ray.exceptions.RayError):
        text = _last_line(str(error)) or type(error).__name__
        return Failure(FAILURE_LOST_WORKER, type(error).__name__, f"{type(error).__name__}: {text}")
    return _exception_failure(error)


def _exception_failure(error: BaseException) -> Failure:
    if isinstance(error, DeterministicFailure):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}".strip()
    return Failure(FAILURE_EXCEPTION, text, _last_line(text) or type(error).__name__)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:MAX_ERROR_LENGTH] if lines else ""


@dataclass
class FailureHistory:
    """Failed attempts per piece of work (a trial id or a retrain key)."""

    failures: dict[str, list[Failure]] = field(default_factory=dict)

    def record(self, key: str, failure: Failure) -> bool:
        """Record a failed attempt and return whether the failure is deterministic.

        Deterministic means an exception of the training code with the same signature as
        the previous attempt's failure. Lost workers never are.
        """
        attempts = self.failures.setdefault(key, [])
        previous = attempts[-1] if attempts else None
        attempts.append(failure)
        return (
            previous is not None
            and failure.deterministic_candidate
            and previous.deterministic_candidate
            and previous.signature == failure.signature
        )

    def retries(self, key: str) -> int:
        """Number of failed attempts of ``key`` so far, which is how often it was retried."""
        return len(self.failures.get(key, []))


def guard_trial(trial_function: Callable[..., None]) -> Callable[..., None]:
    """Wrap a Ray Tune trial function so that a cancelled trial raises at once.

    The driver marks a trial whose error repeated by adding ``ABORT_KEY`` to its config
    (see ``TrialRecorder.on_trial_recover``). The wrapped function then raises
    ``DeterministicFailure`` with the original error instead of training again.
    """

    def guarded_trial(config: dict[str, Any], setup: Any, data: Any) -> None:
        if ABORT_KEY in config:
            raise DeterministicFailure(str(config[ABORT_KEY]))
        trial_function(config, setup=setup, data=data)

    guarded_trial.__name__ = getattr(trial_function, "__name__", "trial")
    return guarded_trial


# --- Retries with backoff ---------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``first_delay_s`` doubling up to ``max_delay_s``, for ``limit_s``."""

    limit_s: float = DEFAULT_OUTAGE_LIMIT_S
    first_delay_s: float = 1.0
    # A refused connection costs nothing, and a short cap delivers soon after the store returns.
    max_delay_s: float = 10.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (counting from 1)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(0, failures - 1))


def outage_limit_from_environment(environ: Mapping[str, str] | None = None) -> float:
    """Return the outage limit in seconds from ``HPO_TRACKING_OUTAGE_LIMIT_S`` or the default.

    Raises SpecError for a value that is not a positive number.
    """
    from orchestrator.errors import SpecError

    environ = os.environ if environ is None else environ
    text = environ.get(OUTAGE_LIMIT_ENV)
    if text is None or text.strip() == "":
        return DEFAULT_OUTAGE_LIMIT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise SpecError(
            f"{OUTAGE_LIMIT_ENV}={text!r} is invalid; set it to a positive number of seconds, "
            f"e.g. {DEFAULT_OUTAGE_LIMIT_S:.0f}"
        )
    return value


def is_transient_tracking_error(error: BaseException) -> bool:
    """Tell whether a tracking-store error may go away when retried later.

    Connection failures, timeouts, database operational errors and MLflow's
    server-side error codes are transient; invalid requests are not.
    """
    from mlflow.exceptions import MlflowException

    for item in _exception_chain(error):
        if isinstance(item, MlflowException):
            if item.error_code in TRANSIENT_MLFLOW_CODES:
                return True
            continue
        if isinstance(item, (ConnectionError, TimeoutError)):
            return True
        if _is_network_or_database_error(item):
            return True
    return False


def _exception_chain(error: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    item: BaseException | None = error
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        yield item
        item = item.__cause__ or item.__context__


def _is_network_or_database_error(error: BaseException) -> bool:
    import requests
    import sqlalchemy.exc

    return isinstance(error, (
        requests.ConnectionError, requests.Timeout,
        sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError,
    ))


class TrackingUnavailableError(RunFailedError):
    """The tracking store stayed unreachable past the outage limit; the study stopped."""


# --- Journal of undelivered tracking writes ----------------------------------------------


class TrackingJournal:
    """Append-only JSON-lines file of MLflow writes that wait for the store.

    Each line is one write (see ``orchestrator.tracking.Tracker``). The file exists only
    while writes wait; it is removed once they are delivered. A line cut short by a crash
    is skipped when the file is read back.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> list[dict[str, Any]]:
        """Return the writes in the file, oldest first; an absent file contains none."""
        if not self.path.exists():
            return []
        operations = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                operations.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping line %d of %s: cut short by an interrupted write", number, self.path)
        return operations

    def append(self, operations: Iterable[Mapping[str, Any]]) -> None:
        """Append writes and force them to disk."""
        lines = "".join(json.dumps(operation) + "\n" for operation in operations)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def replace(self, operations: Iterable[Mapping[str, Any]]) -> None:
        """Replace the file's content with ``operations`` atomically; none removes the file."""
        operations = list(operations)
        if not operations:
            self.clear()
            return
        partial = self.path.with_name(self.path.name + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(operation) + "\n" for operation in operations))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)

    def clear(self) -> None:
        """Remove the file."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# --- Stop signals -----------------------------------------------------------------------


class StudyInterrupted(BaseException):
    """SIGINT or SIGTERM arrived; the study stops, marks its runs KILLED and exits.

    A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` in Ray
    or MLflow swallows it. ``exit_code`` is 128 + the signal number (130 for SIGINT, 143
    for SIGTERM). ``hint`` is the command that continues the study.
    """

    def __init__(self, signum: int, hint: str = ""):
        super().__init__(signum)
        self.signum = signum
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        text = f"stopped by {name}; runs in progress were marked KILLED"
        return f"{text}; {self.hint}" if self.hint else text


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager that turns SIGINT and SIGTERM into a clean stop of the study.

    The first signal only records the request: the study checks it at safe points (the
    Tune stopper, the retrain loop, waits for the tracking store, cell boundaries) and
    raises ``StudyInterrupted`` there. Raising inside the handler instead would land in
    Ray's compiled code, which turns it into a ``SystemError``. A second signal raises at
    once, for a study stuck between safe points. ``ray.init`` installs its own SIGTERM
    handler, so the study calls ``reinstall_stop_handlers`` after connecting to Ray. The
    previous handlers are restored on exit. Outside the main thread this does nothing.
    """

    active: StopSignals | None = None

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.received: int | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.getsignal(signum)
        self.install()
        StopSignals.active = self
        return self

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            logger.warning("received %s; stopping the study (send it again to stop at once)", name)
            return
        logger.warning("received %s again; stopping at once", name)
        raise StudyInterrupted(self.received)

    def __exit__(self, *exc_info: Any) -> None:
        if StopSignals.active is self:
            StopSignals.active = None
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def reinstall_stop_handlers() -> None:
    """Install the active ``StopSignals`` handlers again (after ``ray.init`` replaced them)."""
    active = StopSignals.active
    if active is not None and threading.current_thread() is threading.main_thread():
        active.install()


def stop_requested() -> int | None:
    """Return the stop signal this process received, or None."""
    active = StopSignals.active
    return None if active is None else active.received


def raise_if_stopped() -> None:
    """Raise ``StudyInterrupted`` when a stop signal has arrived; a safe point of the study."""
    signum = stop_requested()
    if signum is not None:
        raise StudyInterrupted(signum)


def interruptible_sleep(seconds: float) -> None:
    """Sleep, raising ``StudyInterrupted`` within half a second of a stop signal."""
    deadline = time.monotonic() + seconds
    while True:
        raise_if_stopped()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.5, left))


def elapsed_since(start: float | None) -> float:
    """Seconds since a ``time.monotonic()`` reading, 0 for None."""
    return 0.0 if start is None else time.monotonic() - start
