"""Converting Table 1 for Ray Tune, ConfigSpace and scikit-optimize."""

from __future__ import annotations

import math

import ConfigSpace
import pytest
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform
from skopt import space as skopt_space

from search_spaces import load_space, parse_space, to_configspace, to_skopt, to_tune
from trainables.errors import SpecError


@pytest.fixture(scope="module")
def table1_ls():
    return load_space("table1").restrict({"loss": "ls"})


@pytest.fixture(scope="module")
def integer_space():
    document = {"parameters": [{"name": "width", "type": "int", "low": 16, "high": 256, "log": True},
                               {"name": "depth", "type": "int", "low": 1, "high": 9}]}
    return parse_space(document, "inline")


def test_to_tune_bounds_and_scale(table1_ls):
    domains = to_tune(table1_ls)

    assert list(domains) == ["learning_rate", "lr_multiplier", "smoothing_alpha"]
    learning_rate = domains["learning_rate"]
    assert isinstance(learning_rate, Float)
    assert (learning_rate.lower, learning_rate.upper) == (1e-5, 0.5)
    assert isinstance(learning_rate.get_sampler(), LogUniform)
    multiplier = domains["lr_multiplier"]
    assert isinstance(multiplier, Categorical)
    assert multiplier.categories == [0.01, 0.1, 0.5]
    alpha = domains["smoothing_alpha"]
    assert (alpha.lower, alpha.upper) == (0.01, 0.25)
    assert isinstance(alpha.get_sampler(), Uniform)


def test_to_tune_integer_upper_bound_inclusive(integer_space):
    domains = to_tune(integer_space)

    # Tune's integer domains exclude the upper bound.
    assert isinstance(domains["width"], Integer)
    assert (domains["width"].lower, domains["width"].upper) == (16, 257)
    assert isinstance(domains["width"].get_sampler(), LogUniform)
    assert (domains["depth"].lower, domains["depth"].upper) == (1, 10)


def test_to_configspace_bounds_and_scale(table1_ls):
    configuration_space = to_configspace(table1_ls, seed=0)

    learning_rate = configuration_space["learning_rate"]
    assert isinstance(learning_rate, ConfigSpace.UniformFloatHyperparameter)
    assert (learning_rate.lower, learning_rate.upper, learning_rate.log) == (1e-5, 0.5, True)
    multiplier = configuration_space["lr_multiplier"]
    assert isinstance(multiplier, ConfigSpace.CategoricalHyperparameter)
    assert tuple(multiplier.choices) == (0.01, 0.1, 0.5)
    alpha = configuration_space["smoothing_alpha"]
    assert (alpha.lower, alpha.upper, alpha.log) == (0.01, 0.25, False)


def test_to_configspace_seed_reproducible(table1_ls):
    first = [dict(c) for c in to_configspace(table1_ls, seed=3).sample_configuration(5)]
    second = [dict(c) for c in to_configspace(table1_ls, seed=3).sample_configuration(5)]

    assert first == second


def test_to_configspace_integers(integer_space):
    configuration_space = to_configspace(integer_space, seed=0)

    width = configuration_space["width"]
    assert isinstance(width, ConfigSpace.UniformIntegerHyperparameter)
    assert (width.lower, width.upper, width.log) == (16, 256, True)


def test_to_skopt_bounds_and_prior(table1_ls):
    dimensions = to_skopt(table1_ls)

    learning_rate, multiplier, alpha = dimensions
    assert isinstance(learning_rate, skopt_space.Real)
    assert (learning_rate.name, learning_rate.low, learning_rate.high) == ("learning_rate", 1e-5, 0.5)
    assert learning_rate.prior == "log-uniform"
    assert isinstance(multiplier, skopt_space.Categorical)
    assert multiplier.categories == (0.01, 0.1, 0.5)
    assert isinstance(alpha, skopt_space.Real)
    assert (alpha.low, alpha.high, alpha.prior) == (0.01, 0.25, "uniform")


def test_to_skopt_log_dimension_is_log_scaled(table1_ls):
    learning_rate = to_skopt(table1_ls)[0]

    samples = learning_rate.rvs(n_samples=2000, random_state=0)

    assert math.isclose(sorted(samples)[1000], math.sqrt(1e-5 * 0.5), rel_tol=0.5)


def test_to_skopt_integers(integer_space):
    width, depth = to_skopt(integer_space)

    assert isinstance(width, skopt_space.Integer)
    assert (width.low, width.high, width.prior) == (16, 256, "log-uniform")
    assert (depth.low, depth.high, depth.prior) == (1, 9, "uniform")


@pytest.mark.parametrize("convert", [to_tune, to_configspace, to_skopt])
def test_conditional_space_rejected(convert):
    with pytest.raises(SpecError, match=r"parameters smoothing_alpha, relaxation_alpha depend on loss; "
                                         r"call restrict\(\{'loss': \.\.\.\}\) first"):
        convert(load_space("table1"))
