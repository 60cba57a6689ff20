"""Health counters of a running or finished search."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["search_health"]

logger = logging.getLogger(__name__)


def search_health(search_alg: Any) -> dict[str, int]:
    """Return and log counters that show whether a searcher works as intended.

    Wrappers such as Ray Tune's ``SearchGenerator`` and ``ConcurrencyLimiter`` are
    unwrapped through their ``searcher`` attribute. Every searcher reports
    ``suggested``; the others depend on the searcher:

    - ``SeededTuneBOHB`` (bohb): ``model_based`` picks of the kernel density model
      (hpbandster falls back to random picks silently) and ``results`` passed to it;
    - ``SkOptSearcher`` (skopt): ``model_based``, ``told``, ``penalised`` (NaN or inf
      results), ``skipped`` (failed trials), ``pending`` and ``pauses`` (pauses the
      scheduler reported: Hyperband pauses trials at its rungs, ASHA never does);
    - ``RandomSearcher`` (random): ``completed`` and ``pauses``.

    Raises:
        TypeError: the searcher is not one of this package's searchers.
    """
    searcher = search_alg
    while hasattr(searcher, "searcher"):
        searcher = searcher.searcher
    health = getattr(searcher, "health", None)
    if not callable(health):
        raise TypeError(
            f"search_health supports the searchers of orchestrator.searchers, got {type(searcher).__name__}"
        )
    counters = {name: int(value) for name, value in health().items()}
    logger.info("search health of %s: %s", type(searcher).__name__, counters)
    return counters
