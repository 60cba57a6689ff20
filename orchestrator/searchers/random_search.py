"""Seeded random search over a ``SearchSpace``: the baseline of the ``random`` preset."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from orchestrator.searchers.base import SpaceSearcher
from search_spaces import SearchSpace

__all__ = ["RandomSearcher"]

logger = logging.getLogger(__name__)


class RandomSearcher(SpaceSearcher):
    """Draw each configuration independently from the space with a seeded numpy Generator.

    Log-scaled parameters are drawn log-uniformly and categorical values are the declared
    choices. The same seed gives the same sequence of configurations. Completed trials
    do not change later draws.
    """

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
        super().__init__(
            space,
            metric=metric,
            mode=mode,
            seed=seed,
            max_concurrent=max_concurrent,
            points_to_evaluate=points_to_evaluate,
        )
        self._rng = np.random.default_rng(seed)
        self._live: dict[str, dict[str, Any]] = {}
        self._suggested = 0
        self._completed = 0

    def live_trials(self) -> set[str]:
        """Ids of trials suggested and not yet completed."""
        return set(self._live)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """Return the next point to evaluate or a fresh draw, or None at the concurrency limit."""
        if self.at_concurrency_limit():
            return None
        config = self.pop_queued_point()
        if config is None:
            config = {parameter.name: parameter.sample(self._rng) for parameter in self.space.parameters}
        self._live[trial_id] = config
        self._suggested += 1
        return dict(config)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Forget a finished trial, because random search learns nothing from it."""
        self._live.pop(trial_id, None)
        self._paused.discard(trial_id)
        self._completed += 1

    def get_state(self) -> dict[str, Any]:
        """Return the complete state: RNG, live trials and counters, as JSON-serialisable data."""
        state = super().get_state()
        state.update(
            rng=self._rng.bit_generator.state,
            live=self._live,
            counters={"suggested": self._suggested, "completed": self._completed},
        )
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``get_state``."""
        super().set_state(state)
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
        self._live = {trial_id: dict(config) for trial_id, config in state["live"].items()}
        self._suggested = state["counters"]["suggested"]
        self._completed = state["counters"]["completed"]

    def health(self) -> dict[str, int]:
        """Return the number of suggested and completed trials and of pauses a scheduler reported."""
        return {"suggested": self._suggested, "completed": self._completed, "pauses": self._pauses}
