"""Declarative search spaces: typed parameters, conditions and the YAML loader.

A search space file is a YAML mapping with an optional ``name`` and ``description`` and
a list of ``parameters``. Each parameter has a ``name``, a ``type`` and type-specific
fields:

- ``float`` and ``int``: ``low`` and ``high`` (both inclusive) and optional ``log``
  (sample uniformly in log space, which needs ``low > 0``);
- ``categorical``: ``choices``, a non-empty list of distinct scalars.

A parameter may carry ``when: {loss: [ls]}``: it is searched only in study cells whose
value of that fixed study dimension (dataset, model or loss) is listed.
``SearchSpace.restrict`` resolves these conditions for one cell. The converters in
``search_spaces.convert`` accept only restricted spaces.

Every malformed file raises ``SpecError`` with one line that names the file, the
parameter and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

import numpy as np
import yaml

from trainables.errors import SpecError

__all__ = [
    "BUILTIN_DIR",
    "CategoricalParameter",
    "FloatParameter",
    "IntParameter",
    "PARAMETER_TYPES",
    "Parameter",
    "STUDY_DIMENSIONS",
    "SearchSpace",
    "available_spaces",
    "load_space",
    "parse_space",
]

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent
"""Folder of the built-in space files (``<name>.yaml``)."""

STUDY_DIMENSIONS = ("dataset", "model", "loss")
"""Fixed study dimensions a ``when`` condition may test."""

Scalar = Union[str, int, float, bool]
Condition = tuple[tuple[str, tuple[Scalar, ...]], ...]

_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOP_LEVEL_KEYS = ("name", "description", "parameters")


# Parameters --------------------------------------------------------------------------


def _condition_matches(when: Condition, context: Mapping[str, Any]) -> bool:
    return all(context[key] in values for key, values in when)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


@dataclass(frozen=True)
class FloatParameter:
    """A real-valued parameter in ``[low, high]``, searched log-uniformly if ``log``."""

    name: str
    low: float
    high: float
    log: bool = False
    when: Condition = ()

    kind: ClassVar[str] = "float"

    def contains(self, value: object) -> bool:
        """Return whether ``value`` is a number inside the closed bounds."""
        return _is_number(value) and self.low <= float(value) <= self.high

    def coerce(self, value: object) -> float:
        """Convert a value from an optimizer to a plain float clipped to the bounds.

        Clipping absorbs round-off such as 0.49999999999999994 from a log transform.
        """
        return min(max(float(value), self.low), self.high)

    def sample(self, rng: np.random.Generator) -> float:
        """Draw one value, uniformly or log-uniformly."""
        if self.log:
            return self.coerce(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return self.coerce(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class IntParameter:
    """An integer parameter in ``[low, high]`` (both inclusive), log-uniform if ``log``."""

    name: str
    low: int
    high: int
    log: bool = False
    when: Condition = ()

    kind: ClassVar[str] = "int"

    def contains(self, value: object) -> bool:
        """Return whether ``value`` is an integer inside the closed bounds."""
        integral = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        return integral and self.low <= int(value) <= self.high

    def coerce(self, value: object) -> int:
        """Convert a value from an optimizer to a plain int inside the bounds."""
        return min(max(int(round(float(value))), self.low), self.high)

    def sample(self, rng: np.random.Generator) -> int:
        """Draw one value; log-uniform draws cover ``[low, high + 1)`` before flooring."""
        if self.log:
            drawn = math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))
            return min(max(int(math.floor(drawn)), self.low), self.high)
        return int(rng.integers(self.low, self.high + 1))


@dataclass(frozen=True)
class CategoricalParameter:
    """A parameter that takes one of ``choices``, kept as the original Python objects."""

    name: str
    choices: tuple[Scalar, ...]
    when: Condition = ()

    kind: ClassVar[str] = "categorical"

    def contains(self, value: object) -> bool:
        """Return whether ``value`` equals one of the choices."""
        return self._index(value) is not None

    def coerce(self, value: object) -> Scalar:
        """Return the declared choice equal to ``value`` (never a numpy scalar).

        Raises:
            ValueError: ``value`` is none of the choices.
        """
        index = self._index(value)
        if index is None:
            raise ValueError(
                f"value {value!r} of parameter '{self.name}' is not one of {list(self.choices)}"
            )
        return self.choices[index]

    def sample(self, rng: np.random.Generator) -> Scalar:
        """Draw one choice uniformly."""
        return self.choices[int(rng.integers(len(self.choices)))]

    def _index(self, value: object) -> int | None:
        # Prefer a choice of the same type, so True does not match a choice 1.
        plain = value.item() if isinstance(value, np.generic) else value
        for index, choice in enumerate(self.choices):
            if type(choice) is type(plain) and choice == plain:
                return index
        for index, choice in enumerate(self.choices):
            if choice == plain:
                return index
        return None


Parameter = Union[FloatParameter, IntParameter, CategoricalParameter]


# Search space ------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of parameters loaded from one space file.

    Attributes:
        name: the space's name (the file's ``name`` or its stem).
        parameters: the parameters in file order.
        source: the file the space came from.
        description: free text from the file.
        context: the study dimensions the space was restricted to, as (key, value) pairs.
    """

    name: str
    parameters: tuple[Parameter, ...]
    source: str
    description: str = ""
    context: tuple[tuple[str, Scalar], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names in file order."""
        return tuple(parameter.name for parameter in self.parameters)

    @property
    def conditional(self) -> tuple[Parameter, ...]:
        """Parameters whose ``when`` condition is not resolved yet."""
        return tuple(parameter for parameter in self.parameters if parameter.when)

    def parameter(self, name: str) -> Parameter:
        """Return the parameter called ``name``.

        Raises:
            KeyError: no parameter has that name.
        """
        for parameter in self.parameters:
            if parameter.name == name:
                return parameter
        raise KeyError(f"search space '{self.name}' has no parameter '{name}'")

    def require_resolved(self, purpose: str) -> None:
        """Raise ``SpecError`` naming the fix if conditional parameters remain.

        Args:
            purpose: what needs the resolved space, for the message (e.g. "Ray Tune").
        """
        if not self.conditional:
            return
        names = ", ".join(parameter.name for parameter in self.conditional)
        dimensions = sorted({key for parameter in self.conditional for key, _ in parameter.when})
        call = ", ".join(f"'{dimension}': ..." for dimension in dimensions)
        raise SpecError(
            f"search space '{self.name}' ({self.source}) cannot be used for {purpose}: "
            f"parameters {names} depend on {', '.join(dimensions)}; call "
            f"restrict({{{call}}}) first"
        )

    def restrict(self, context: Mapping[str, Any]) -> SearchSpace:
        """Keep the parameters whose condition matches one study cell.

        Args:
            context: the cell's fixed study dimensions, e.g.
                ``{"dataset": "mnist", "model": "mlp", "loss": "ls"}``. Keys that no
                condition tests are ignored.

        Returns:
            A space without conditions: matching conditional parameters are kept
            unconditionally and the others are dropped.

        Raises:
            SpecError: a condition tests a dimension that ``context`` lacks.
        """
        for parameter in self.conditional:
            missing = [key for key, _ in parameter.when if key not in context]
            if missing:
                raise SpecError(
                    f"search space '{self.name}' ({self.source}): parameter "
                    f"'{parameter.name}' depends on '{missing[0]}', which the context "
                    f"{dict(context)} lacks; pass the cell's {missing[0]}"
                )
        kept = tuple(
            dataclasses.replace(parameter, when=())
            for parameter in self.parameters
            if _condition_matches(parameter.when, context)
        )
        merged = dict(self.context)
        merged.update(context)
        return dataclasses.replace(self, parameters=kept, context=tuple(sorted(merged.items())))

    def to_python(self, config: Mapping[str, Any]) -> dict[str, Scalar]:
        """Convert an optimizer's configuration to plain Python values of this space.

        Floats become ``float``, integers ``int`` and categorical values the declared
        choices, so numpy scalars never reach logs or JSON.

        Raises:
            KeyError: ``config`` lacks a parameter of the space.
            ValueError: a categorical value is none of its choices.
        """
        return {parameter.name: parameter.coerce(config[parameter.name]) for parameter in self.parameters}


# Loading -----------------------------------------------------------------------------


def available_spaces() -> list[str]:
    """Return the names of the built-in spaces, sorted."""
    return sorted(path.stem for path in BUILTIN_DIR.glob("*.yaml"))


def load_space(name_or_path: str | os.PathLike[str]) -> SearchSpace:
    """Load a built-in space by name (see ``available_spaces``) or a space file by path.

    Raises:
        SpecError: the name is neither built in nor an existing file, or the file is
            unreadable or malformed. The message names the file, the parameter and
            the fix.
    """
    text_form = os.fspath(name_or_path)
    builtins = available_spaces()
    if text_form in builtins:
        path = BUILTIN_DIR / f"{text_form}.yaml"
    else:
        path = Path(text_form).expanduser()
        if not path.is_file():
            hint = _did_you_mean(text_form, builtins)
            raise SpecError(
                f"search space '{text_form}' not found: expected a built-in name "
                f"({', '.join(builtins)}) or the path of a YAML file{hint}"
            )
    source = str(path.resolve())
    logger.debug("loading search space from %s", source)
    return parse_space(_read_yaml(path, source), source, default_name=path.stem)


def parse_space(document: object, source: str, *, default_name: str = "space") -> SearchSpace:
    """Validate a parsed space document and build the ``SearchSpace``.

    Args:
        document: the YAML document, as ``yaml.safe_load`` returns it.
        source: the file name used in error messages.
        default_name: the space's name when the document has none.

    Raises:
        SpecError: the document does not follow the schema in this module's docstring.
    """
    if not isinstance(document, Mapping):
        raise SpecError(
            f"search space {source}: expected a mapping with a 'parameters' list at the "
            f"top level, got {type(document).__name__}; see search_spaces/table1.yaml"
        )
    _check_keys(document, (), _TOP_LEVEL_KEYS, f"search space {source}", "the top level")

    # Top-level fields
    name = document.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise SpecError(f"search space {source}: name {name!r} is not a non-empty string; quote it")
    description = document.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"search space {source}: description {description!r} is not a string; quote it")
    items = document.get("parameters")
    if not isinstance(items, list) or not items:
        raise SpecError(
            f"search space {source}: 'parameters' is missing or not a non-empty list; "
            "list the parameters, each with a name and a type"
        )

    # Parameters, then names unique across the file
    parameters = tuple(_parse_parameter(item, position, source) for position, item in enumerate(items, 1))
    seen: set[str] = set()
    for parameter in parameters:
        if parameter.name in seen:
            raise SpecError(
                f"search space {source}, parameter '{parameter.name}': the name is defined "
                "twice; rename or remove one definition"
            )
        seen.add(parameter.name)
    return SearchSpace(name=name, parameters=parameters, source=source, description=description)


# YAML reading ------------------------------------------------------------------------


class _SpaceLoader(yaml.SafeLoader):
    """Safe loader that reads ``1e-5`` as a float (as YAML 1.2 does) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# PyYAML implements YAML 1.1, where a float needs a decimal point: ``1e-5`` would be the
# string "1e-5". This resolver adds the YAML 1.2 form without a point.
_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: Path, source: str) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"search space {source} could not be read ({err}); check that it is a readable UTF-8 text file") from err
    try:
        return yaml.load(text, Loader=_SpaceLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(
            f"search space {source} is not valid YAML{where}: {problem}; fix the syntax there"
        ) from err


# Parameter parsing -------------------------------------------------------------------


@dataclass(frozen=True)
class _ParameterType:
    """Schema of one parameter type: its fields and how to build the parameter."""

    required: tuple[str, ...]
    optional: tuple[str, ...]
    build: Callable[[Mapping[str, Any], str, str], Parameter]


def _build_float(item: Mapping[str, Any], name: str, where: str) -> FloatParameter:
    low, high, log = _parse_bounds(item, where, integral=False)
    return FloatParameter(name=name, low=float(low), high=float(high), log=log, when=_parse_when(item, where))


def _build_int(item: Mapping[str, Any], name: str, where: str) -> IntParameter:
    low, high, log = _parse_bounds(item, where, integral=True)
    return IntParameter(name=name, low=int(low), high=int(high), log=log, when=_parse_when(item, where))


def _build_categorical(item: Mapping[str, Any], name: str, where: str) -> CategoricalParameter:
    return CategoricalParameter(name=name, choices=_parse_choices(item, where), when=_parse_when(item, where))


PARAMETER_TYPES: dict[str, _ParameterType] = {
    "float": _ParameterType(("name", "type", "low", "high"), ("log", "when"), _build_float),
    "int": _ParameterType(("name", "type", "low", "high"), ("log", "when"), _build_int),
    "categorical": _ParameterType(("name", "type", "choices"), ("when",), _build_categorical),
}
"""Parameter types by the name used in space files."""


def _parse_parameter(item: object, position: int, source: str) -> Parameter:
    # Name first, so every later message can name the parameter
    if not isinstance(item, Mapping):
        raise SpecError(
            f"search space {source}, parameter #{position}: expected a mapping with name "
            f"and type, got {item!r}; write it as '- name: ...' followed by its fields"
        )
    name = item.get("name")
    if name is None:
        raise SpecError(f"search space {source}, parameter #{position}: missing field 'name'; add a name")
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise SpecError(
            f"search space {source}, parameter #{position}: name {name!r} is not an "
            "identifier; use letters, digits and underscores, starting with a letter"
        )
    where = f"search space {source}, parameter '{name}'"

    # Type, then the fields that type allows and needs
    kind = item.get("type")
    if kind is None:
        raise SpecError(f"{where}: missing field 'type'; set it to one of {', '.join(PARAMETER_TYPES)}")
    parameter_type = PARAMETER_TYPES.get(kind) if isinstance(kind, str) else None
    if parameter_type is None:
        hint = _did_you_mean(str(kind), PARAMETER_TYPES)
        raise SpecError(f"{where}: unknown type {kind!r}; expected one of {', '.join(PARAMETER_TYPES)}{hint}")
    _check_keys(item, parameter_type.required, parameter_type.optional, where, f"type {kind}")
    return parameter_type.build(item, name, where)


def _check_keys(
    item: Mapping[str, Any], required: Sequence[str], optional: Sequence[str], where: str, scope: str
) -> None:
    allowed = (*required, *optional)
    for key in item:
        if key in allowed:
            continue
        owners = [kind for kind, schema in PARAMETER_TYPES.items() if key in schema.required + schema.optional]
        if owners and scope.startswith("type "):
            raise SpecError(
                f"{where}: key {key!r} does not apply to {scope}; remove it or set type to {owners[0]}"
            )
        hint = _did_you_mean(str(key), allowed)
        raise SpecError(f"{where}: unknown key {key!r}; expected keys of {scope}: {', '.join(allowed)}{hint}")
    for key in required:
        if key not in item:
            raise SpecError(f"{where}: missing field {key!r}, which {scope} requires; add it")


def _parse_bounds(item: Mapping[str, Any], where: str, *, integral: bool) -> tuple[float, float, bool]:
    # Each bound: a finite number, and an integer for int parameters
    bounds = {}
    for key in ("low", "high"):
        value = item[key]
        if not _is_number(value) or not math.isfinite(value):
            fix = "remove the quotes" if isinstance(value, str) else "write a number"
            raise SpecError(f"{where}: {key} {value!r} is not a finite number; {fix}")
        if integral and not isinstance(value, int):
            raise SpecError(f"{where}: {key} {value!r} is not an integer; write a whole number for type int")
        bounds[key] = value
    low, high = bounds["low"], bounds["high"]

    # Order and the log-scale domain
    log = item.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"{where}: log {log!r} is not true or false; write log: true or log: false")
    if low >= high:
        raise SpecError(f"{where}: low {low!r} is not below high {high!r}; set low < high")
    if log and low <= 0:
        raise SpecError(
            f"{where}: log scale needs low > 0, got low {low!r}; raise low above 0 or set log: false"
        )
    return low, high, log


def _parse_choices(item: Mapping[str, Any], where: str) -> tuple[Scalar, ...]:
    choices = item["choices"]
    if not isinstance(choices, list) or not choices:
        raise SpecError(f"{where}: choices {choices!r} is not a non-empty list; list at least one value")
    for choice in choices:
        if not isinstance(choice, (str, int, float, bool)):
            raise SpecError(
                f"{where}: choice {choice!r} is not a string, number or boolean; use scalar choices"
            )
    for index, choice in enumerate(choices):
        if choice in choices[:index]:
            raise SpecError(f"{where}: choice {choice!r} is listed twice; remove the duplicate")
    return tuple(choices)


def _parse_when(item: Mapping[str, Any], where: str) -> Condition:
    when = item.get("when")
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise SpecError(f"{where}: when {when!r} is not a mapping such as {{loss: [ls]}}; rewrite it")
    condition = []
    for key, values in when.items():
        if key not in STUDY_DIMENSIONS:
            hint = _did_you_mean(str(key), STUDY_DIMENSIONS)
            raise SpecError(
                f"{where}: condition on unknown dimension {key!r}; expected one of "
                f"{', '.join(STUDY_DIMENSIONS)}{hint}"
            )
        listed = [values] if isinstance(values, (str, int, float, bool)) else values
        if not isinstance(listed, list) or not listed:
            raise SpecError(f"{where}: when.{key} {values!r} is not a non-empty list; list the values")
        condition.append((key, tuple(listed)))
    return tuple(condition)


def _did_you_mean(word: str, options: Sequence[str] | Mapping[str, Any]) -> str:
    matches = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
