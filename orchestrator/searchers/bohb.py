"""TuneBOHB on our own ConfigSpace, with a seeded RNG and a count of model-based picks.

hpbandster's BOHB config generator falls back to random configurations whenever its
kernel density model fails and reports it only in a log line, so a "BOHB" search can
silently be random search. ``SeededTuneBOHB`` counts the suggestions whose info dict
has ``model_based_pick`` set, which ``search_health`` reports.

hpbandster draws from numpy's global RNG (the random fraction, the kernel samples).
``SeededTuneBOHB`` runs those calls with a private ``RandomState`` swapped in, so the
same seed gives the same sequence on one worker and other code's draws are unaffected.
The swap is not thread-safe; Ray Tune calls searchers from the driver's event loop only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from hpbandster.optimizers.config_generators.bohb import BOHB
from ray.tune.search.bohb import TuneBOHB

from orchestrator.searchers.base import MODES, validate_points
from search_spaces import SearchSpace, to_configspace
from trainables.errors import SpecError

__all__ = ["SeededTuneBOHB"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _global_numpy_rng(rng: np.random.RandomState) -> Iterator[None]:
    """Run a block with numpy's global RNG set to ``rng``'s state, then write the state back."""
    outer_state = np.random.get_state()
    np.random.set_state(rng.get_state())
    try:
        yield
    finally:
        rng.set_state(np.random.get_state())
        np.random.set_state(outer_state)


class _CountingBOHB(BOHB):
    """hpbandster's BOHB that counts model-based picks and returns plain Python values."""

    def __init__(self, configspace: Any, *, space: SearchSpace, seed: int | None, **bohb_config: Any) -> None:
        super().__init__(configspace, **bohb_config)
        self.search_space = space
        self.rng = np.random.RandomState(seed)
        self.suggestions = 0
        self.model_based_picks = 0
        self.results = 0

    def get_config(self, budget: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
        with _global_numpy_rng(self.rng):
            config, info = super().get_config(budget)
        self.suggestions += 1
        self.model_based_picks += int(bool(info.get("model_based_pick")))
        return self.search_space.to_python(config), info

    def new_result(self, job: Any, update_model: bool = True) -> None:
        with _global_numpy_rng(self.rng):
            super().new_result(job, update_model=update_model)
        self.results += 1


class SeededTuneBOHB(TuneBOHB):
    """``TuneBOHB`` built from a ``SearchSpace`` with the ConfigSpace 1.x API.

    Use it with ``HyperBandForBOHB``, which adds the budget to each result and
    calls ``on_pause``/``on_unpause``. Suggestions are plain Python values. Save and
    restore use TuneBOHB's cloudpickle of the whole object, counters included.

    Args:
        space: the space to search; must have no unresolved conditions.
        metric: name of the reported result to optimise.
        mode: "min" or "max".
        seed: seeds the configuration space's sampler and the private numpy RNG.
        max_concurrent: maximum running (not paused) trials; 0 means no limit.
        points_to_evaluate: configurations to suggest first, in order.
        bohb_config: keyword arguments of hpbandster's BOHB config generator,
            e.g. ``min_points_in_model`` or ``random_fraction``.

    Raises:
        SpecError: invalid mode, metric, space or points.
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
        bohb_config: Mapping[str, Any] | None = None,
    ) -> None:
        if mode not in MODES:
            raise SpecError(f"mode {mode!r} is invalid; use 'min' or 'max'")
        if not isinstance(metric, str) or not metric:
            raise SpecError(f"metric {metric!r} is invalid; name the reported result to optimise")
        self.search_space = space
        self.suggested = 0
        super().__init__(
            space=to_configspace(space, seed),
            bohb_config=dict(bohb_config or {}),
            metric=metric,
            mode=mode,
            points_to_evaluate=validate_points(space, points_to_evaluate),
            seed=seed,
            max_concurrent=max_concurrent,
        )

    def _setup_bohb(self) -> None:
        super()._setup_bohb()
        self.bohber = _CountingBOHB(
            self._space, space=self.search_space, seed=self._seed, **(self._bohb_config or {})
        )

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """Return the next configuration as plain Python values, or None at the concurrency limit."""
        config = super().suggest(trial_id)
        if config is not None:
            self.suggested += 1
            logger.debug("trial %s: suggested %s", trial_id, config)
        return config

    def health(self) -> dict[str, int]:
        """Return counters: suggested trials, model-based picks and results passed to BOHB."""
        return {
            "suggested": self.suggested,
            "model_based": self.bohber.model_based_picks,
            "results": self.bohber.results,
        }
