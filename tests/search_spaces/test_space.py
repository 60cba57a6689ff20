"""Loading, validating and restricting declarative search spaces."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from search_spaces import (
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    available_spaces,
    load_space,
)
from trainables.errors import InputError, SpecError


def write_space(tmp_path: Path, body: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


# Built-in spaces and lookup ----------------------------------------------------------


def test_available_spaces_lists_table1():
    assert "table1" in available_spaces()


def test_table1_loads_by_name():
    space = load_space("table1")

    assert space.name == "table1"
    assert space.names == ("learning_rate", "lr_multiplier", "smoothing_alpha", "relaxation_alpha")
    assert space.source.endswith("table1.yaml")
    assert space.parameter("learning_rate") == FloatParameter("learning_rate", 1e-5, 0.5, log=True)
    assert space.parameter("lr_multiplier") == CategoricalParameter("lr_multiplier", (0.01, 0.1, 0.5))
    assert space.parameter("smoothing_alpha").when == (("loss", ("ls",)),)
    assert space.parameter("relaxation_alpha").when == (("loss", ("lr",)),)


def test_space_loads_by_path(tmp_path):
    path = write_space(
        tmp_path,
        """
        parameters:
          - {name: width, type: int, low: 16, high: 256, log: true}
        """,
        name="widths.yaml",
    )

    space = load_space(path)

    assert space.name == "widths"
    assert space.parameters == (IntParameter("width", 16, 256, log=True),)
    assert space.source == str(path.resolve())


def test_unknown_space_name_lists_builtins():
    with pytest.raises(SpecError, match=r"search space 'tabel1' not found.*table1.*did you mean 'table1'"):
        load_space("tabel1")


def test_spec_error_is_input_error():
    with pytest.raises(InputError):
        load_space("/nonexistent/space.yaml")


def test_exponent_without_point_reads_as_float(tmp_path):
    # PyYAML alone would read 1e-5 as the string "1e-5".
    path = write_space(
        tmp_path,
        """
        parameters:
          - {name: lr, type: float, low: 1e-5, high: 5E-1, log: true}
        """,
    )

    parameter = load_space(path).parameter("lr")

    assert parameter.low == 1e-5
    assert parameter.high == 0.5


# Malformed files ---------------------------------------------------------------------

MALFORMED = {
    "unknown type": (
        "- {name: lr, type: flot, low: 0.1, high: 1.0}",
        r"parameter 'lr': unknown type 'flot'; expected one of float, int, categorical \(did you mean 'float'\?\)",
    ),
    "low not below high": (
        "- {name: lr, type: float, low: 0.5, high: 0.5}",
        r"parameter 'lr': low 0.5 is not below high 0.5; set low < high",
    ),
    "log with zero low": (
        "- {name: lr, type: float, low: 0.0, high: 0.5, log: true}",
        r"parameter 'lr': log scale needs low > 0, got low 0.0; raise low above 0 or set log: false",
    ),
    "log with negative int low": (
        "- {name: width, type: int, low: -4, high: 8, log: true}",
        r"parameter 'width': log scale needs low > 0",
    ),
    "empty choices": (
        "- {name: act, type: categorical, choices: []}",
        r"parameter 'act': choices \[\] is not a non-empty list; list at least one value",
    ),
    "duplicate choice": (
        "- {name: act, type: categorical, choices: [relu, relu]}",
        r"parameter 'act': choice 'relu' is listed twice; remove the duplicate",
    ),
    "duplicate names": (
        "- {name: lr, type: float, low: 0.1, high: 1.0}\n- {name: lr, type: float, low: 0.2, high: 1.0}",
        r"parameter 'lr': the name is defined twice; rename or remove one definition",
    ),
    "unknown key": (
        "- {name: lr, type: float, low: 0.1, hihg: 1.0}",
        r"parameter 'lr': unknown key 'hihg'; expected keys of type float: .* \(did you mean 'high'\?\)",
    ),
    "key of another type": (
        "- {name: lr, type: float, low: 0.1, high: 1.0, choices: [1]}",
        r"parameter 'lr': key 'choices' does not apply to type float; remove it or set type to categorical",
    ),
    "missing bound": (
        "- {name: lr, type: float, low: 0.1}",
        r"parameter 'lr': missing field 'high', which type float requires; add it",
    ),
    "missing type": (
        "- {name: lr, low: 0.1, high: 1.0}",
        r"parameter 'lr': missing field 'type'; set it to one of float, int, categorical",
    ),
    "missing name": (
        "- {type: float, low: 0.1, high: 1.0}",
        r"parameter #1: missing field 'name'; add a name",
    ),
    "quoted bound": (
        "- {name: lr, type: float, low: '0.1', high: 1.0}",
        r"parameter 'lr': low '0.1' is not a finite number; remove the quotes",
    ),
    "fractional int bound": (
        "- {name: width, type: int, low: 1.5, high: 8}",
        r"parameter 'width': low 1.5 is not an integer",
    ),
    "non-boolean log": (
        "- {name: lr, type: float, low: 0.1, high: 1.0, log: yes please}",
        r"parameter 'lr': log 'yes please' is not true or false",
    ),
    "condition on unknown dimension": (
        "- {name: alpha, type: float, low: 0.1, high: 0.2, when: {los: [ls]}}",
        r"parameter 'alpha': condition on unknown dimension 'los'; expected one of dataset, model, loss "
        r"\(did you mean 'loss'\?\)",
    ),
    "empty condition values": (
        "- {name: alpha, type: float, low: 0.1, high: 0.2, when: {loss: []}}",
        r"parameter 'alpha': when.loss \[\] is not a non-empty list",
    ),
    "invalid name": (
        "- {name: 2nd, type: float, low: 0.1, high: 0.2}",
        r"parameter #1: name '2nd' is not an identifier",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_parameter_rejected(tmp_path, case):
    items, expected = MALFORMED[case]
    path = write_space(tmp_path, "parameters:\n" + textwrap.indent(items, "  ") + "\n")

    with pytest.raises(SpecError) as caught:
        load_space(path)

    message = str(caught.value)
    assert f"search space {path.resolve()}" in message
    assert "\n" not in message
    assert caught.match(expected)


def test_unreadable_yaml_names_file_and_line(tmp_path):
    path = write_space(tmp_path, "parameters:\n  - {name: lr, type: float\n  - oops\n")

    with pytest.raises(SpecError) as caught:
        load_space(path)

    assert str(path.resolve()) in str(caught.value)
    assert caught.match(r"is not valid YAML at line \d+, column \d+: .*; fix the syntax there")


def test_duplicate_yaml_key_rejected(tmp_path):
    path = write_space(
        tmp_path,
        """
        parameters:
          - name: lr
            type: float
            low: 0.1
            low: 0.2
            high: 1.0
        """,
    )

    with pytest.raises(SpecError, match=r"is not valid YAML at line 6, column 5: duplicate key 'low'"):
        load_space(path)


def test_unknown_top_level_key_rejected(tmp_path):
    path = write_space(tmp_path, "paramters:\n  - {name: lr, type: float, low: 0.1, high: 1.0}\n")

    with pytest.raises(SpecError, match=r"unknown key 'paramters'.*did you mean 'parameters'"):
        load_space(path)


def test_missing_parameters_rejected(tmp_path):
    path = write_space(tmp_path, "name: empty\nparameters: []\n")

    with pytest.raises(SpecError, match=r"'parameters' is missing or not a non-empty list"):
        load_space(path)


def test_non_mapping_document_rejected(tmp_path):
    path = write_space(tmp_path, "- just\n- a list\n")

    with pytest.raises(SpecError, match=r"expected a mapping with a 'parameters' list at the top level, got list"):
        load_space(path)


def test_unreadable_file_rejected(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")

    with pytest.raises(SpecError, match=r"could not be read"):
        load_space(path)


# Restriction -------------------------------------------------------------------------


def test_restrict_ce_keeps_unconditional_parameters():
    space = load_space("table1").restrict({"loss": "ce"})

    assert space.names == ("learning_rate", "lr_multiplier")
    assert space.conditional == ()
    assert space.context == (("loss", "ce"),)


def test_restrict_ls_adds_smoothing_alpha():
    space = load_space("table1").restrict({"dataset": "mnist", "model": "mlp", "loss": "ls"})

    assert space.names == ("learning_rate", "lr_multiplier", "smoothing_alpha")
    assert space.parameter("smoothing_alpha") == FloatParameter("smoothing_alpha", 0.01, 0.25)


def test_restrict_lr_adds_relaxation_alpha():
    space = load_space("table1").restrict({"loss": "lr"})

    assert space.names == ("learning_rate", "lr_multiplier", "relaxation_alpha")


def test_restrict_without_dimension_rejected():
    with pytest.raises(SpecError, match=r"parameter 'smoothing_alpha' depends on 'loss'.*pass the cell's loss"):
        load_space("table1").restrict({"dataset": "mnist"})


# Values ------------------------------------------------------------------------------


def test_to_python_returns_plain_types():
    space = load_space("table1").restrict({"loss": "ls"})

    config = space.to_python(
        {"learning_rate": np.float64(0.01), "lr_multiplier": np.float64(0.1), "smoothing_alpha": np.float32(0.2)}
    )

    assert [type(value) for value in config.values()] == [float, float, float]
    assert config["lr_multiplier"] == 0.1


def test_categorical_coerce_keeps_declared_type():
    parameter = CategoricalParameter("flag", (1, True, "relu"))

    assert parameter.coerce(np.True_) is True
    assert type(parameter.coerce(np.int64(1))) is int
    assert parameter.coerce(np.str_("relu")) == "relu"
    assert type(parameter.coerce(np.str_("relu"))) is str
    with pytest.raises(ValueError, match=r"value 'tanh' of parameter 'flag' is not one of"):
        parameter.coerce("tanh")


@pytest.mark.parametrize(
    "parameter",
    [
        FloatParameter("x", 1e-5, 0.5, log=True),
        FloatParameter("x", -1.0, 1.0),
        IntParameter("n", 1, 1000, log=True),
        IntParameter("n", -3, 3),
        CategoricalParameter("c", (0.01, 0.1, 0.5)),
    ],
)
def test_samples_stay_inside_space(parameter):
    rng = np.random.default_rng(0)

    samples = [parameter.sample(rng) for _ in range(500)]

    assert all(parameter.contains(value) for value in samples)
    assert len(set(samples)) > 1


def test_log_sampling_covers_decades():
    parameter = FloatParameter("lr", 1e-5, 0.5, log=True)
    rng = np.random.default_rng(0)

    decades = np.floor(np.log10([parameter.sample(rng) for _ in range(2000)]))

    # A uniform draw would put nearly all values in the top decade.
    assert set(decades) == {-5.0, -4.0, -3.0, -2.0, -1.0}
