"""Converters from one ``SearchSpace`` to the formats of Ray Tune, ConfigSpace and skopt.

All three accept only spaces without unresolved ``when`` conditions (call
``SearchSpace.restrict`` with the study cell first), so a parameter that applies to one
loss is never searched for another. Bounds are inclusive in the space file; Ray Tune's
integer domains exclude their upper bound, so ``to_tune`` passes ``high + 1``.

The third-party packages are imported inside the converters, so loading and validating
a space needs only PyYAML and numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from search_spaces.space import (
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    Parameter,
    SearchSpace,
)
from trainables.errors import SpecError

__all__ = ["to_configspace", "to_skopt", "to_tune"]


def to_tune(space: SearchSpace) -> dict[str, Any]:
    """Build a Ray Tune param space: ``tune.uniform``/``loguniform``, ``randint``/``lograndint``, ``choice``.

    Raises:
        SpecError: the space still has conditional parameters.
    """
    space.require_resolved("Ray Tune")
    return {parameter.name: _TUNE_DOMAINS[parameter.kind](parameter) for parameter in space.parameters}


def to_configspace(space: SearchSpace, seed: int | None = None) -> Any:
    """Build a ``ConfigSpace.ConfigurationSpace`` with the ConfigSpace 1.x API.

    Ray Tune's own conversion passes a ``q`` argument that ConfigSpace 1.x removed, so
    TuneBOHB gets this object instead.

    Args:
        space: a restricted space.
        seed: seed of the configuration space's sampler; None draws one from the OS.

    Raises:
        SpecError: the space still has conditional parameters.
    """
    import ConfigSpace

    space.require_resolved("ConfigSpace")
    configuration_space = ConfigSpace.ConfigurationSpace(name=space.name, seed=seed)
    configuration_space.add([_CONFIGSPACE_HYPERPARAMETERS[p.kind](p) for p in space.parameters])
    return configuration_space


def to_skopt(space: SearchSpace) -> list[Any]:
    """Build scikit-optimize dimensions, in the order of the space's parameters.

    Log-scaled parameters get ``prior="log-uniform"``; categorical dimensions keep the
    declared choices.

    Raises:
        SpecError: the space still has conditional parameters.
    """
    space.require_resolved("scikit-optimize")
    return [_SKOPT_DIMENSIONS[parameter.kind](parameter) for parameter in space.parameters]


# Ray Tune ----------------------------------------------------------------------------


def _float_to_tune(parameter: FloatParameter) -> Any:
    from ray import tune

    sampler = tune.loguniform if parameter.log else tune.uniform
    return sampler(parameter.low, parameter.high)


def _int_to_tune(parameter: IntParameter) -> Any:
    from ray import tune

    sampler = tune.lograndint if parameter.log else tune.randint
    return sampler(parameter.low, parameter.high + 1)


def _categorical_to_tune(parameter: CategoricalParameter) -> Any:
    from ray import tune

    return tune.choice(list(parameter.choices))


_TUNE_DOMAINS: dict[str, Callable[[Parameter], Any]] = {
    "float": _float_to_tune,
    "int": _int_to_tune,
    "categorical": _categorical_to_tune,
}


# ConfigSpace -------------------------------------------------------------------------


def _float_to_configspace(parameter: FloatParameter) -> Any:
    from ConfigSpace import Float

    return Float(parameter.name, (parameter.low, parameter.high), log=parameter.log)


def _int_to_configspace(parameter: IntParameter) -> Any:
    from ConfigSpace import Integer

    return Integer(parameter.name, (parameter.low, parameter.high), log=parameter.log)


def _categorical_to_configspace(parameter: CategoricalParameter) -> Any:
    from ConfigSpace import Categorical

    return Categorical(parameter.name, list(parameter.choices))


_CONFIGSPACE_HYPERPARAMETERS: dict[str, Callable[[Parameter], Any]] = {
    "float": _float_to_configspace,
    "int": _int_to_configspace,
    "categorical": _categorical_to_configspace,
}


# scikit-optimize ---------------------------------------------------------------------


def _prior(parameter: FloatParameter | IntParameter) -> str:
    return "log-uniform" if parameter.log else "uniform"


def _float_to_skopt(parameter: FloatParameter) -> Any:
    from skopt.space import Real

    return Real(parameter.low, parameter.high, prior=_prior(parameter), name=parameter.name)


def _int_to_skopt(parameter: IntParameter) -> Any:
    from skopt.space import Integer

    return Integer(parameter.low, parameter.high, prior=_prior(parameter), name=parameter.name)


def _categorical_to_skopt(parameter: CategoricalParameter) -> Any:
    from skopt.space import Categorical

    return Categorical(list(parameter.choices), name=parameter.name)


_SKOPT_DIMENSIONS: dict[str, Callable[[Parameter], Any]] = {
    "float": _float_to_skopt,
    "int": _int_to_skopt,
    "categorical": _categorical_to_skopt,
}
