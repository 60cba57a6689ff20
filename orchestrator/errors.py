"""Errors of the service, re-exported for the orchestrator's modules and users."""

from trainables.errors import (
    ClusterError,
    DataError,
    HpoError,
    InputError,
    RunFailedError,
    SpecError,
    TrackingError,
)

__all__ = [
    "ClusterError",
    "DataError",
    "HpoError",
    "InputError",
    "RunFailedError",
    "SpecError",
    "TrackingError",
]
