"""Search presets (bohb, skopt, random), our scikit-optimize Searcher and health counters.

``build_search`` pairs a searcher with a scheduler for one restricted ``SearchSpace``;
``search_health`` reports whether the search is model based as intended.
"""

from orchestrator.searchers.base import SpaceSearcher
from orchestrator.searchers.bohb import SeededTuneBOHB
from orchestrator.searchers.health import search_health
from orchestrator.searchers.presets import PRESETS, TIME_ATTR, Preset, SearchPlan, SearchSettings, build_search
from orchestrator.searchers.random_search import RandomSearcher
from orchestrator.searchers.skopt_searcher import SkOptSearcher, nonfinite_penalty

__all__ = [
    "PRESETS",
    "TIME_ATTR",
    "Preset",
    "RandomSearcher",
    "SearchPlan",
    "SearchSettings",
    "SeededTuneBOHB",
    "SkOptSearcher",
    "SpaceSearcher",
    "build_search",
    "nonfinite_penalty",
    "search_health",
]
