"""Ray Tune ``Searcher`` around scikit-optimize's ask/tell ``Optimizer`` (Gaussian process).

Ray Tune no longer ships a scikit-optimize searcher, so this module provides one.

Implementation notes:

- skopt minimises, so the reported value is negated for mode "max".
- A trial is told once, when it completes, with the last value it reported at the budget
  it reached. Trials a Hyperband or ASHA scheduler stopped early are therefore told a
  value at a smaller budget than ``max_t``. Ray passes the last result to
  ``on_trial_complete`` for a trial stopped while running but None for a paused trial
  that Hyperband stops, so the searcher keeps each trial's last reported value from
  ``on_trial_result`` and tells that one.
- NaN or infinite objectives would break the Gaussian process, so such a trial is told a
  finite penalty (see ``nonfinite_penalty``) and a warning is logged. Until a finite value
  exists the point waits and is told once one arrives.
- Trials that failed (``error=True``) or never reported the metric as a number are
  skipped with a warning; their points are not told.
- While trials are pending, later suggestions come from a copy of the optimizer that was
  told the constant-liar value min(y) at each pending point, so parallel trials spread
  out instead of repeating one point.
- ``get_state`` returns plain JSON-serialisable data: observations, the pending
  trial-to-point map, last reported values, the optimizer's RNG state and acquisition
  state, and counters. ``set_state`` rebuilds the optimizer from it, so a restored
  searcher continues with the same suggestions as the original.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from skopt import Optimizer

from orchestrator.searchers.base import SpaceSearcher, is_finite_number
from search_spaces import SearchSpace, to_skopt

__all__ = ["SkOptSearcher", "nonfinite_penalty"]

logger = logging.getLogger(__name__)

_SEED_RANGE = np.iinfo(np.int32).max


def nonfinite_penalty(finite_objectives: Sequence[float]) -> float | None:
    """Return the objective told in place of a NaN or infinite one.

    The penalty is the worst finite objective so far plus the spread of the finite
    objectives (or plus max(|worst|, 1) when they are all equal): worse than every real
    observation but on their scale, so the Gaussian process's normalisation stays usable.
    Objectives are minimised.

    Returns:
        The penalty, or None when no finite objective exists yet.
    """
    if not finite_objectives:
        return None
    worst, best = max(finite_objectives), min(finite_objectives)
    margin = worst - best if worst > best else max(abs(worst), 1.0)
    return float(worst + margin)


class SkOptSearcher(SpaceSearcher):
    """Bayesian optimisation with scikit-optimize's Gaussian-process ``Optimizer``.

    Args:
        space: the space to search; must have no unresolved conditions.
        metric: name of the reported result to optimise.
        mode: "min" or "max".
        seed: seed of the optimizer's RNG (initial points, model fitting, acquisition).
        max_concurrent: maximum running trials started by this searcher; 0 means no limit.
        points_to_evaluate: configurations to suggest first, in order. Their results
            count towards the initial points.
        n_initial_points: observations before the Gaussian process proposes points;
            until then points are drawn at random.
        acq_func: skopt acquisition function, "gp_hedge" by default.
        acq_optimizer: "sampling" (default) takes the best of 10,000 random candidates;
            "lbfgs" refines the best ones with L-BFGS. For spaces of a few dimensions
            sampling finds comparable optima and costs about a sixth of the time per
            result (measured: 0.12 s against 0.7 s per tell, 24 tells on the Table 1
            space for label smoothing, 2 shared CPU cores).

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
        n_initial_points: int = 10,
        acq_func: str = "gp_hedge",
        acq_optimizer: str = "sampling",
    ) -> None:
        super().__init__(
            space,
            metric=metric,
            mode=mode,
            seed=seed,
            max_concurrent=max_concurrent,
            points_to_evaluate=points_to_evaluate,
        )
        self._n_initial_points = n_initial_points
        self._acq_func = acq_func
        self._acq_optimizer = acq_optimizer
        self._optimizer = self._new_optimizer()
        self._pending: dict[str, list[Any]] = {}
        self._last_values: dict[str, float] = {}
        self._deferred: list[list[Any]] = []
        self._penalised: list[int] = []
        self._counters = {"suggested": 0, "model_based": 0, "told": 0, "penalised": 0, "skipped": 0}

    def _new_optimizer(self) -> Optimizer:
        return Optimizer(
            to_skopt(self.space),
            base_estimator="GP",
            n_initial_points=self._n_initial_points,
            acq_func=self._acq_func,
            acq_optimizer=self._acq_optimizer,
            random_state=self._seed,
        )

    def live_trials(self) -> set[str]:
        """Ids of trials suggested and not yet completed."""
        return set(self._pending)

    # Suggesting ------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """Return the next configuration as plain Python values, or None at the concurrency limit."""
        if self.at_concurrency_limit():
            return None
        queued = self.pop_queued_point()
        if queued is not None:
            point, model_based = [queued[name] for name in self.space.names], False
        else:
            point, model_based = self._ask()
        config = self.space.to_python(dict(zip(self.space.names, point)))
        self._pending[trial_id] = [config[name] for name in self.space.names]
        self._counters["suggested"] += 1
        self._counters["model_based"] += int(model_based)
        logger.debug("trial %s: suggested %s (model based: %s)", trial_id, config, model_based)
        return config

    def _ask(self) -> tuple[list[Any], bool]:
        # Random initial points, then the Gaussian process; constant liar for pending points
        optimizer = self._optimizer
        if len(optimizer.Xi) < optimizer.n_initial_points_:
            return optimizer.ask(), False
        if not self._pending:
            return optimizer.ask(), True
        liar = optimizer.copy(random_state=optimizer.rng.randint(0, _SEED_RANGE))
        pending = list(self._pending.values())
        liar.tell(pending, [float(min(optimizer.yi))] * len(pending))
        return liar.ask(), True

    # Learning --------------------------------------------------------------------

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Remember the latest value of the metric, which is told if the trial ends without a result."""
        value = result.get(self.metric)
        if trial_id in self._pending and isinstance(value, numbers.Real):
            self._last_values[trial_id] = float(value)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Tell the optimizer the trial's last reported value, or skip a failed trial."""
        point = self._pending.pop(trial_id, None)
        self._paused.discard(trial_id)
        last_value = self._last_values.pop(trial_id, None)
        if point is None:
            logger.warning("trial %s completed but was not suggested by this searcher; ignoring it", trial_id)
            return

        # Failed trials and trials without the metric teach nothing
        value = result.get(self.metric) if result else None
        if value is None:
            value = last_value
        if error or not isinstance(value, numbers.Real):
            self._counters["skipped"] += 1
            reason = "failed" if error else f"reported no numeric '{self.metric}' (got {value!r})"
            logger.warning("trial %s %s; its point %s is not told to the optimizer", trial_id, reason, point)
            return

        # Finite values are told, others get the penalty or wait for a finite value
        if is_finite_number(value):
            self._tell(point, self.objective(float(value)))
            self._tell_deferred()
            return
        penalty = nonfinite_penalty(self._finite_objectives())
        if penalty is None:
            logger.warning(
                "trial %s reported %s=%s and no finite value exists yet; its point waits for one",
                trial_id, self.metric, value,
            )
            self._deferred.append(point)
            return
        logger.warning(
            "trial %s reported %s=%s; telling the penalty %s (minimised) instead",
            trial_id, self.metric, value, penalty,
        )
        self._tell(point, penalty, penalised=True)

    def _tell(self, point: list[Any], objective: float, *, penalised: bool = False) -> None:
        if penalised:
            self._penalised.append(len(self._optimizer.yi))
            self._counters["penalised"] += 1
        self._optimizer.tell(list(point), float(objective))
        self._counters["told"] += 1

    def _tell_deferred(self) -> None:
        while self._deferred:
            penalty = nonfinite_penalty(self._finite_objectives())
            assert penalty is not None, "deferred points are told only after a finite objective"
            point = self._deferred.pop(0)
            logger.warning("telling the penalty %s for the deferred non-finite point %s", penalty, point)
            self._tell(point, penalty, penalised=True)

    def _finite_objectives(self) -> list[float]:
        penalised = set(self._penalised)
        return [float(y) for index, y in enumerate(self._optimizer.yi) if index not in penalised]

    # State -----------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """Return the complete state as JSON-serialisable data.

        Contains the optimizer's observations (``Xi``, ``yi``), its RNG and acquisition
        state, the pending trial-to-point map, last reported values, points waiting
        for a finite value, the indices of penalised observations and the counters.
        """
        state = super().get_state()
        state.update(
            n_initial_points=self._n_initial_points,
            acq_func=self._acq_func,
            acq_optimizer=self._acq_optimizer,
            optimizer=_optimizer_state(self._optimizer),
            pending={trial_id: list(point) for trial_id, point in self._pending.items()},
            last_values=dict(self._last_values),
            deferred=[list(point) for point in self._deferred],
            penalised=list(self._penalised),
            counters=dict(self._counters),
        )
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``get_state`` and rebuild the optimizer from it."""
        super().set_state(state)
        self._n_initial_points = state["n_initial_points"]
        self._acq_func = state["acq_func"]
        self._acq_optimizer = state["acq_optimizer"]
        self._optimizer = self._new_optimizer()
        _restore_optimizer(self._optimizer, state["optimizer"])
        self._pending = {trial_id: list(point) for trial_id, point in state["pending"].items()}
        self._last_values = {trial_id: float(value) for trial_id, value in state["last_values"].items()}
        self._deferred = [list(point) for point in state["deferred"]]
        self._penalised = list(state["penalised"])
        self._counters = dict(state["counters"])

    def health(self) -> dict[str, int]:
        """Return counters: suggested, model-based suggestions, told, penalised, skipped, pending
        trials and pauses a scheduler reported."""
        return {**self._counters, "pending": len(self._pending), "pauses": self._pauses}


# Optimizer state ---------------------------------------------------------------------
#
# NOTE: next_x, next_xs_ and gains_ are private attributes of skopt.Optimizer (0.10);
# pyproject.toml pins scikit-optimize below 0.11 because this restore depends on them.


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _optimizer_state(optimizer: Optimizer) -> dict[str, Any]:
    name, keys, position, has_gauss, cached_gaussian = optimizer.rng.get_state()
    next_x = getattr(optimizer, "_next_x", None)
    next_xs = getattr(optimizer, "next_xs_", None)
    gains = getattr(optimizer, "gains_", None)
    return {
        "Xi": [[_plain(value) for value in point] for point in optimizer.Xi],
        "yi": [float(y) for y in optimizer.yi],
        "rng": {
            "name": name,
            "keys": keys.tolist(),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "next_x": None if next_x is None else [_plain(value) for value in next_x],
        "next_xs": None if next_xs is None else [np.asarray(x, dtype=float).tolist() for x in next_xs],
        "gains": None if gains is None else np.asarray(gains, dtype=float).tolist(),
    }


def _restore_optimizer(optimizer: Optimizer, state: Mapping[str, Any]) -> None:
    # Refit on all observations at once, then put back the RNG and acquisition state
    if state["Xi"]:
        optimizer.tell([list(point) for point in state["Xi"]], list(state["yi"]))
    rng = state["rng"]
    optimizer.rng.set_state(
        (rng["name"], np.asarray(rng["keys"], dtype=np.uint32), rng["position"], rng["has_gauss"], rng["cached_gaussian"])
    )
    if state["next_x"] is not None:
        optimizer._next_x = list(state["next_x"])
    if state["next_xs"] is not None:
        optimizer.next_xs_ = [np.asarray(x, dtype=float) for x in state["next_xs"]]
    if state["gains"] is not None:
        optimizer.gains_ = np.asarray(state["gains"], dtype=float)
