"""Declarative search spaces (YAML files such as ``table1.yaml``) and their converters.

``load_space`` reads a built-in space by name or a space file by path.
``SearchSpace.restrict`` resolves ``when`` conditions for one study cell. ``to_tune``,
``to_configspace`` and ``to_skopt`` convert a restricted space for Ray Tune, TuneBOHB
and scikit-optimize.
"""

from search_spaces.convert import to_configspace, to_skopt, to_tune
from search_spaces.space import (
    PARAMETER_TYPES,
    STUDY_DIMENSIONS,
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    Parameter,
    SearchSpace,
    available_spaces,
    load_space,
    parse_space,
)

__all__ = [
    "PARAMETER_TYPES",
    "STUDY_DIMENSIONS",
    "CategoricalParameter",
    "FloatParameter",
    "IntParameter",
    "Parameter",
    "SearchSpace",
    "available_spaces",
    "load_space",
    "parse_space",
    "to_configspace",
    "to_skopt",
    "to_tune",
]
