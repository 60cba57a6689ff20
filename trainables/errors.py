"""Exception hierarchy of the service.

Every error the service raises on purpose derives from ``HpoError``. The command line
prints the message of such an error as one line and exits with its ``exit_code``: 2 for
bad input (a study file, missing data, an unreachable tracking store, resources the
cluster lacks), 1 for work that failed after it started. Messages name the value that
failed and say what to do.

This module sits in ``trainables`` because that is the lowest of the three packages:
``orchestrator`` and ``search_spaces`` import it, and ``trainables`` imports neither.
"""

from __future__ import annotations

__all__ = [
    "ClusterError",
    "DataError",
    "HpoError",
    "InputError",
    "RunFailedError",
    "SpecError",
    "TrackingError",
]


class HpoError(Exception):
    """Base class of every error the service raises on purpose."""

    exit_code = 1


class InputError(HpoError):
    """Bad input found before any work started; the command line exits with 2."""

    exit_code = 2


class SpecError(InputError):
    """Invalid study file, search space file or option value."""


class DataError(InputError):
    """Dataset files missing, unreadable or inconsistent."""


class TrackingError(InputError):
    """MLflow tracking store unreachable or unusable."""


class ClusterError(InputError):
    """Ray cluster unreachable, unauthenticated or without the resources a study needs."""


class RunFailedError(HpoError):
    """Work that started and then failed; the command line exits with 1."""

    exit_code = 1
