"""Search presets: a searcher ("what to try") paired with a scheduler ("when to stop").

``PRESETS`` is the registry; ``build_search`` validates the settings once and builds
both halves. Time is ``training_iteration``, one per epoch, so ``max_t`` and
``grace_period`` are epochs.

| preset | searcher                               | schedulers (default first) |
|--------|----------------------------------------|----------------------------|
| bohb   | TuneBOHB on our ConfigSpace (seeded)   | hyperband                  |
| skopt  | SkOptSearcher (Gaussian process)       | hyperband, asha            |
| random | RandomSearcher (seeded numpy sampler)  | asha, hyperband            |

"hyperband" is Ray's ``HyperBandForBOHB`` for every preset. It pauses a trial at each
rung even while its bracket is not full, so new trials can join the bracket, and calls
the searcher's ``on_pause``/``on_unpause`` so paused trials do not count against its
concurrency limit. Ray's plain ``HyperBandScheduler`` halves a bracket with only the
trials that exist when the first one reaches a rung, so with one trial at a time
almost every trial runs to ``max_t``.

The search algorithm carries the space, metric and mode, and the scheduler carries the
metric and mode. So the Tuner's ``param_space`` may hold only fixed values, and
``tune.TuneConfig`` gets no ``metric`` or ``mode``: Ray Tune rejects both when its search
algorithm and scheduler already have them.
"""

from __future__ import annotations

import difflib
import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray.tune.schedulers import ASHAScheduler, HyperBandForBOHB, TrialScheduler
from ray.tune.search import Searcher

from orchestrator.searchers.bohb import SeededTuneBOHB
from orchestrator.searchers.random_search import RandomSearcher
from orchestrator.searchers.skopt_searcher import SkOptSearcher
from search_spaces import SearchSpace
from trainables.errors import SpecError

__all__ = ["PRESETS", "Preset", "SearchPlan", "SearchSettings", "build_search"]

logger = logging.getLogger(__name__)

TIME_ATTR = "training_iteration"
"""Result key that measures a trial's budget: one per epoch."""


@dataclass(frozen=True)
class SearchPlan:
    """The two halves of a search, ready for ``tune.TuneConfig(search_alg=..., scheduler=...)``."""

    search_alg: Searcher
    scheduler: TrialScheduler


@dataclass(frozen=True)
class SearchSettings:
    """Validated settings shared by the searcher and scheduler builders.

    Attributes:
        metric: reported result to optimise.
        mode: "min" or "max".
        max_t: maximum epochs of one trial.
        reduction_factor: Hyperband's eta, the factor between rungs (> 1).
        num_samples: trials the study will start.
        seed: seed of the searcher's random choices.
        max_concurrent: maximum running trials the searcher starts; 0 means no limit.
        grace_period: ASHA's minimum epochs before stopping a trial.
        points_to_evaluate: configurations to try first, in order.
    """

    metric: str
    mode: str
    max_t: int
    reduction_factor: float
    num_samples: int
    seed: int
    max_concurrent: int
    grace_period: int = 1
    points_to_evaluate: tuple[Mapping[str, Any], ...] = field(default=())


@dataclass(frozen=True)
class Preset:
    """One registered preset: how to build its searcher and which schedulers it allows."""

    description: str
    build_searcher: Callable[[SearchSpace, SearchSettings], Searcher]
    schedulers: Mapping[str, Callable[[SearchSettings], TrialScheduler]]

    @property
    def default_scheduler(self) -> str:
        """The first allowed scheduler."""
        return next(iter(self.schedulers))


# Searchers ---------------------------------------------------------------------------


def _build_bohb(space: SearchSpace, settings: SearchSettings) -> Searcher:
    return SeededTuneBOHB(
        space,
        metric=settings.metric,
        mode=settings.mode,
        seed=settings.seed,
        max_concurrent=settings.max_concurrent,
        points_to_evaluate=settings.points_to_evaluate,
    )


def _build_skopt(space: SearchSpace, settings: SearchSettings) -> Searcher:
    # A third of the trials start at random, at most skopt's default of 10.
    return SkOptSearcher(
        space,
        metric=settings.metric,
        mode=settings.mode,
        seed=settings.seed,
        max_concurrent=settings.max_concurrent,
        points_to_evaluate=settings.points_to_evaluate,
        n_initial_points=max(1, min(10, settings.num_samples // 3)),
    )


def _build_random(space: SearchSpace, settings: SearchSettings) -> Searcher:
    return RandomSearcher(
        space,
        metric=settings.metric,
        mode=settings.mode,
        seed=settings.seed,
        max_concurrent=settings.max_concurrent,
        points_to_evaluate=settings.points_to_evaluate,
    )


# Schedulers --------------------------------------------------------------------------


def _build_hyperband(settings: SearchSettings) -> TrialScheduler:
    return HyperBandForBOHB(
        time_attr=TIME_ATTR,
        metric=settings.metric,
        mode=settings.mode,
        max_t=settings.max_t,
        reduction_factor=settings.reduction_factor,
    )


def _build_asha(settings: SearchSettings) -> TrialScheduler:
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=settings.metric,
        mode=settings.mode,
        max_t=settings.max_t,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


PRESETS: dict[str, Preset] = {
    "bohb": Preset(
        "TuneBOHB (kernel-density Bayesian optimisation) with HyperBandForBOHB",
        _build_bohb,
        {"hyperband": _build_hyperband},
    ),
    "skopt": Preset(
        "scikit-optimize Gaussian process with Hyperband or ASHA",
        _build_skopt,
        {"hyperband": _build_hyperband, "asha": _build_asha},
    ),
    "random": Preset(
        "seeded random search with ASHA (the baseline)",
        _build_random,
        {"asha": _build_asha, "hyperband": _build_hyperband},
    ),
}
"""Search presets by name."""


# Entry point -------------------------------------------------------------------------


def build_search(
    preset: str,
    space: SearchSpace,
    *,
    metric: str,
    mode: str,
    max_t: int,
    reduction_factor: float,
    num_samples: int,
    seed: int,
    max_concurrent: int,
    scheduler: str | None = None,
    grace_period: int = 1,
    points_to_evaluate: Sequence[Mapping[str, Any]] | None = None,
) -> SearchPlan:
    """Build the searcher and scheduler of one preset for a restricted space.

    Args:
        preset: a name in ``PRESETS``.
        space: the space of one study cell (``SearchSpace.restrict`` applied).
        metric: reported result to optimise, e.g. "val_accuracy".
        mode: "min" or "max".
        max_t: maximum epochs of one trial (>= 1).
        reduction_factor: Hyperband's eta (> 1).
        num_samples: trials the study will start (>= 1); sizes skopt's random start.
        seed: seed of the searcher's random choices (an int).
        max_concurrent: maximum running trials the searcher starts (>= 0, 0 = no limit).
        scheduler: "hyperband" or "asha" where the preset allows it; None picks the
            preset's default.
        grace_period: ASHA's minimum epochs before a trial may stop (1 <= g <= max_t);
            Hyperband derives its rungs from max_t and reduction_factor instead.
        points_to_evaluate: configurations to try first, in order.

    Raises:
        SpecError: an unknown preset or scheduler, an unresolved space, or a setting
            out of range. The message names the value and the fix.
    """
    # Registry look-ups
    entry = PRESETS.get(preset)
    if entry is None:
        hint = _did_you_mean(preset, PRESETS)
        raise SpecError(f"unknown search preset {preset!r}: expected one of {', '.join(PRESETS)}{hint}")
    scheduler_name = entry.default_scheduler if scheduler is None else scheduler
    build_scheduler = entry.schedulers.get(scheduler_name)
    if build_scheduler is None:
        raise SpecError(
            f"scheduler {scheduler_name!r} is not available with search preset {preset!r}: "
            f"expected one of {', '.join(entry.schedulers)}"
        )

    # Settings, checked once for both halves
    space.require_resolved(f"search preset {preset!r}")
    settings = SearchSettings(
        metric=metric,
        mode=mode,
        max_t=max_t,
        reduction_factor=reduction_factor,
        num_samples=num_samples,
        seed=seed,
        max_concurrent=max_concurrent,
        grace_period=grace_period,
        points_to_evaluate=tuple(points_to_evaluate or ()),
    )
    _validate(settings)

    plan = SearchPlan(search_alg=entry.build_searcher(space, settings), scheduler=build_scheduler(settings))
    logger.info(
        "search preset %s: %s, scheduler %s, max_t=%s epochs, reduction_factor=%s, seed=%s",
        preset, type(plan.search_alg).__name__, type(plan.scheduler).__name__,
        max_t, reduction_factor, seed,
    )
    return plan


def _validate(settings: SearchSettings) -> None:
    def is_int(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    checks = [
        (isinstance(settings.metric, str) and settings.metric != "", "metric", settings.metric,
         "name the reported result to optimise"),
        (settings.mode in ("min", "max"), "mode", settings.mode, "use 'min' or 'max'"),
        (is_int(settings.max_t) and settings.max_t >= 1, "max_t", settings.max_t, "use a whole number of epochs >= 1"),
        (isinstance(settings.reduction_factor, numbers.Real) and not isinstance(settings.reduction_factor, bool)
         and settings.reduction_factor > 1, "reduction_factor", settings.reduction_factor, "use a number > 1, e.g. 3"),
        (is_int(settings.num_samples) and settings.num_samples >= 1, "num_samples", settings.num_samples,
         "use a whole number >= 1"),
        (is_int(settings.seed), "seed", settings.seed, "use an integer seed"),
        (is_int(settings.max_concurrent) and settings.max_concurrent >= 0, "max_concurrent",
         settings.max_concurrent, "use a whole number >= 0 (0 means no limit)"),
        (is_int(settings.grace_period) and is_int(settings.max_t) and 1 <= settings.grace_period <= settings.max_t,
         "grace_period", settings.grace_period, f"use a whole number of epochs in [1, max_t={settings.max_t}]"),
    ]
    for valid, name, value, fix in checks:
        if not valid:
            raise SpecError(f"search setting {name}={value!r} is invalid; {fix}")


def _did_you_mean(word: str, options: Mapping[str, Any]) -> str:
    matches = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
