"""Shared bookkeeping of the searchers that draw from a ``SearchSpace``.

``SpaceSearcher`` keeps what every Ray Tune ``Searcher`` of this package needs: the
validated points to evaluate first, the trials it started and which of them a scheduler
paused, the concurrency limit, and saving and restoring its state as JSON. Subclasses
propose configurations and learn from completed trials.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.search import Searcher

from search_spaces import SearchSpace
from trainables.errors import SpecError

__all__ = ["MODES", "SpaceSearcher", "is_finite_number", "validate_points"]

logger = logging.getLogger(__name__)

MODES = {"min": 1.0, "max": -1.0}
"""Sign that turns each optimisation mode into minimisation."""


def validate_points(space: SearchSpace, points: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Check points to evaluate against the space and return them as plain Python values.

    Raises:
        SpecError: a point lacks a parameter, has an unknown one or a value outside the space.
    """
    validated = []
    for position, point in enumerate(points or (), 1):
        where = f"point to evaluate #{position} ({dict(point)!r})"
        missing = [name for name in space.names if name not in point]
        unknown = [name for name in point if name not in space.names]
        if missing or unknown:
            raise SpecError(
                f"{where} does not match search space '{space.name}': missing {missing}, "
                f"unknown {unknown}; give exactly the parameters {list(space.names)}"
            )
        for parameter in space.parameters:
            if not parameter.contains(point[parameter.name]):
                raise SpecError(
                    f"{where}: value {point[parameter.name]!r} of '{parameter.name}' is outside "
                    f"the search space ({_describe(parameter)}); pick a value inside it"
                )
        validated.append(space.to_python(point))
    return validated


def _describe(parameter: Any) -> str:
    if parameter.kind == "categorical":
        return f"one of {list(parameter.choices)}"
    return f"{parameter.kind} in [{parameter.low}, {parameter.high}]"


class SpaceSearcher(Searcher):
    """Base ``Searcher`` over a restricted ``SearchSpace`` with JSON-serialisable state.

    Concurrency: ``suggest`` returns None while ``max_concurrent`` of the trials this
    searcher started are running. Trials a scheduler paused do not count, provided the
    scheduler calls ``on_pause``/``on_unpause`` as ``HyperBandForBOHB`` does. Ray's
    resources still cap what actually runs. Wrapping the searcher in a
    ``ConcurrencyLimiter`` would hide those two methods from ``HyperBandForBOHB``, which
    then fails, so set the limit here instead.

    Args:
        space: the space to search; must have no unresolved conditions.
        metric: name of the reported result to optimise.
        mode: "min" or "max".
        seed: seed of every random choice, so one worker gets the same sequence.
        max_concurrent: maximum running trials started by this searcher; 0 means no limit.
        points_to_evaluate: configurations to suggest first, in order.

    Raises:
        SpecError: invalid mode, metric, space or points.
    """

    state_format = 1

    def __init__(
        self,
        space: SearchSpace,
        *,
        metric: str,
        mode: str,
        seed: int | None,
        max_concurrent: int = 0,
        points_to_evaluate: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if mode not in MODES:
            raise SpecError(f"mode {mode!r} is invalid; use 'min' or 'max'")
        if not isinstance(metric, str) or not metric:
            raise SpecError(f"metric {metric!r} is invalid; name the reported result to optimise")
        space.require_resolved(type(self).__name__)
        super().__init__(metric=metric, mode=mode)
        self._space = space
        self._sign = MODES[mode]
        self._seed = seed
        self._max_concurrent = max_concurrent
        self._queued_points = validate_points(space, points_to_evaluate)
        self._paused: set[str] = set()
        self._pauses = 0

    @property
    def space(self) -> SearchSpace:
        """The searched space."""
        return self._space

    # Concurrency -----------------------------------------------------------------

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Adopt the limit of a wrapping ``ConcurrencyLimiter`` and enforce it here."""
        self._max_concurrent = max_concurrent
        return True

    def on_pause(self, trial_id: str) -> None:
        """Stop counting a trial a scheduler paused against the concurrency limit."""
        if trial_id in self.live_trials():
            self._paused.add(trial_id)
            self._pauses += 1

    def on_unpause(self, trial_id: str) -> None:
        """Count a resumed trial against the concurrency limit again."""
        self._paused.discard(trial_id)

    def live_trials(self) -> set[str]:
        """Ids of trials suggested and not yet completed."""
        raise NotImplementedError

    def at_concurrency_limit(self) -> bool:
        """Return whether ``max_concurrent`` of this searcher's trials are running."""
        if self._max_concurrent <= 0:
            return False
        running = len(self.live_trials() - self._paused)
        return running >= self._max_concurrent

    def pop_queued_point(self) -> dict[str, Any] | None:
        """Remove and return the next point to evaluate, or None when none are left."""
        return self._queued_points.pop(0) if self._queued_points else None

    def objective(self, value: float) -> float:
        """Turn a reported value into the minimised objective (negated for mode "max")."""
        return self._sign * value

    # State -----------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """Return the complete state as JSON-serialisable data (see ``set_state``)."""
        return {
            "format": self.state_format,
            "searcher": type(self).__name__,
            "parameters": list(self._space.names),
            "metric": self._metric,
            "mode": self._mode,
            "seed": self._seed,
            "max_concurrent": self._max_concurrent,
            "queued_points": [dict(point) for point in self._queued_points],
            "paused": sorted(self._paused),
            "pauses": self._pauses,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``get_state``, which must come from the same searcher and space.

        Raises:
            SpecError: the state belongs to another searcher, space or format.
        """
        expected = (self.state_format, type(self).__name__, list(self._space.names))
        found = (state.get("format"), state.get("searcher"), state.get("parameters"))
        if found != expected:
            raise SpecError(
                f"saved searcher state (format, searcher, parameters) = {found} does not match "
                f"{expected}; resume with the original search settings or start a new study"
            )
        self._metric = state["metric"]
        self._mode = state["mode"]
        self._sign = MODES[self._mode]
        self._seed = state["seed"]
        self._max_concurrent = state["max_concurrent"]
        self._queued_points = [dict(point) for point in state["queued_points"]]
        self._paused = set(state["paused"])
        self._pauses = state["pauses"]

    def save(self, checkpoint_path: str) -> None:
        """Write the state to ``checkpoint_path`` as JSON (Ray Tune calls this after each step)."""
        with open(checkpoint_path, "w", encoding="utf-8") as handle:
            json.dump(self.get_state(), handle)

    def restore(self, checkpoint_path: str) -> None:
        """Read a state written by ``save``.

        Raises:
            SpecError: the file is unreadable or contains another searcher's state.
        """
        try:
            with open(checkpoint_path, encoding="utf-8") as handle:
                state = json.load(handle)
        except (OSError, ValueError) as err:
            raise SpecError(
                f"searcher state {checkpoint_path} could not be read ({err}); "
                "restore from an intact experiment folder or start a new study"
            ) from err
        self.set_state(state)

    def health(self) -> dict[str, int]:
        """Return counters that show whether the search works as intended."""
        raise NotImplementedError


def is_finite_number(value: object) -> bool:
    """Return whether ``value`` is a real number that is neither NaN nor infinite."""
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
