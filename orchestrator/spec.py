"""Typed, validated model of a study file.

A study file is a YAML mapping with the top-level keys ``name``, ``directory``,
``datasets``, ``models``, ``losses``, ``model_options`` and the sections ``data``,
``training``, ``tuning``, ``retrain``, ``resources``, ``tracking``, ``storage``, ``cluster``
and ``retries``. Every key has a default, so an empty file is a complete study: the
Fashion-MNIST MLP study with the training setup of Nguyen et al., "Memorization-Dilation:
Modeling Neural Collapse Under Label Noise", ICLR 2023, appendix A.

``load_study`` and ``parse_study`` validate the whole file once. They return a frozen
``StudySpec`` in which every default is filled in and every local path is absolute, so the
rest of the service never checks a study value again. Ray runs each trial in its own
working directory, which is why relative paths are resolved here, on the driver. Bad input
raises ``SpecError`` with a one-line message that names the file, the key, the bad value
and the fix. docs/study-file.md lists every field.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SpecError

logger = logging.getLogger(__name__)

__all__ = [
    "Cell",
    "ClusterSpec",
    "DataSpec",
    "ResourcesSpec",
    "RetrainSpec",
    "RetriesSpec",
    "StorageSpec",
    "StudySpec",
    "TrackingSpec",
    "TrainingSpec",
    "TuningSpec",
    "load_study",
    "parse_study",
]

DEFAULT_DATA_ROOT = "~/.cache/hpo/data"
DEFAULT_RUNS_DIRECTORY = "runs"

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_URL_WITH_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_RAY_ADDRESS = re.compile(r"ray://[^\s/]+|[^\s:/]+:[0-9]{1,5}")

# Metrics that every tuning trial reports once per epoch, with the direction in which
# each one improves.
TUNING_METRIC_MODES: dict[str, str] = {
    "val_accuracy": "max",
    "val_loss": "min",
    "train_accuracy": "max",
    "train_loss": "min",
}
MODES = ("max", "min")


# --- The model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One dataset x model x loss combination: tuned once, then retrained under noise."""

    dataset: str
    model: str
    loss: str

    def __str__(self) -> str:
        return f"{self.dataset}/{self.model}/{self.loss}"


@dataclass(frozen=True)
class DataSpec:
    """Location of the dataset files and the split of the training set for tuning."""

    # Directory of the dataset files in torchvision layout and of the preprocessing
    # cache. The parsed value is absolute with ``~`` expanded.
    root: str = DEFAULT_DATA_ROOT
    # Whether torchvision may download a dataset that is found nowhere else.
    download: bool = False
    # Fraction of the clean training set held out for tuning, in (0, 1).
    validation_fraction: float = 0.2
    # Number of training images kept by a stratified subset for quick runs. None keeps all.
    subset: int | None = None
    # Seed of the stratified validation split and of the subset.
    split_seed: int = 0


@dataclass(frozen=True)
class TrainingSpec:
    """SGD setup shared by tuning trials and retrains."""

    # Epochs of a retrain on the full training set, and the default tuning budget.
    epochs: int = 200
    # Images per SGD step.
    batch_size: int = 512
    # SGD momentum, in [0, 1).
    momentum: float = 0.9
    # Nesterov momentum, which requires momentum > 0.
    nesterov: bool = True
    # L2 penalty passed to SGD as ``weight_decay``.
    weight_decay: float = 1e-3
    # Epochs between two multiplications of the learning rate by the tuned multiplier.
    # None means one fifth of the run's epoch budget (40 of 200 epochs).
    lr_decay_every: int | None = None

    def lr_decay_interval(self, budget_epochs: int) -> int:
        """Return the epochs between learning-rate decays for a run of ``budget_epochs``.

        The schedule is defined on the whole budget of the run, not on the epoch at which
        Hyperband stops a trial.
        """
        if self.lr_decay_every is not None:
            return self.lr_decay_every
        return max(1, budget_epochs // 5)


@dataclass(frozen=True)
class TuningSpec:
    """Hyperparameter search of one cell on the validation split."""

    # Search preset, a name in ``orchestrator.searchers.PRESETS`` (bohb, skopt, random).
    search: str = "bohb"
    # Built-in search space name, or the absolute path of a search space YAML file.
    search_space: str = "table1"
    # Trial scheduler that replaces the preset's default: hyperband or asha where the
    # preset supports it. None keeps the default.
    scheduler: str | None = None
    # Trials per cell.
    num_samples: int = 30
    # Maximum epochs of one trial. Parsing fills in ``training.epochs`` when absent.
    max_epochs: int | None = None
    # Hyperband reduction factor, at least 2.
    reduction_factor: float = 3
    # Seed of the searcher.
    seed: int = 0
    # Maximum trials running at once per cell. None lets the cluster resources decide.
    max_concurrent: int | None = None
    # Reported metric that the search optimises.
    metric: str = "val_accuracy"
    # Direction of ``metric``: max or min.
    mode: str = "max"
    # Winner selection compares trials at the largest budget that at least this many
    # trials reached.
    min_trials_at_budget: int = 2


@dataclass(frozen=True)
class RetrainSpec:
    """Retraining of each cell's winner on the full training set under label noise."""

    # Label-noise rates eta, each in [0, 1).
    noise_levels: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    # Training seeds. Each (eta, seed) pair is one retrain.
    seeds: tuple[int, ...] = (0, 1, 2)
    # Noise kind, a key of ``trainables.noise.NOISE_KINDS``. A corrupted label is drawn
    # from all classes (uniform) or from the other classes (flip).
    noise_kind: str = "uniform"
    # Seed of the label noise. It is separate from the training seed, so every model and
    # loss trains on the same noisy labels.
    noise_seed: int = 0


@dataclass(frozen=True)
class ResourcesSpec:
    """Ray resources that one trial or one retrain requests."""

    # CPUs per trial, > 0. Fractions are allowed.
    cpus_per_trial: float = 1
    # GPUs per trial, >= 0: a fraction up to 1 (0.25 packs four trials on one GPU) or a
    # whole number.
    gpus_per_trial: float = 0


@dataclass(frozen=True)
class TrackingSpec:
    """MLflow tracking store."""

    # Tracking URI. Parsing fills in ``sqlite:///<directory>/mlflow.db`` when absent.
    uri: str | None = None
    # Experiment name. Parsing fills in the study name when absent.
    experiment: str | None = None
    # Seconds the driver keeps retrying an unreachable store before the study stops. Null
    # takes HPO_TRACKING_OUTAGE_LIMIT_S from the environment, or 600.
    outage_limit_s: float | None = None


@dataclass(frozen=True)
class StorageSpec:
    """Ray Tune storage of trial results and checkpoints."""

    # Absolute local path or a URI such as s3://bucket/prefix. Parsing fills in
    # ``<directory>/ray_results`` when absent.
    path: str | None = None


@dataclass(frozen=True)
class ClusterSpec:
    """Ray cluster that runs the study."""

    # auto, local, ray://HOST:PORT or HOST:PORT. None starts a local Ray instance.
    address: str | None = None


@dataclass(frozen=True)
class RetriesSpec:
    """Retries of failed work."""

    # Times a failed trial or retrain is retried before it counts as failed.
    max_failures: int = 2


@dataclass(frozen=True)
class StudySpec:
    """A validated study: what to tune, how to retrain, and where results go.

    Build it with ``load_study`` or ``parse_study``, which fill in every default.
    ``to_dict`` returns the resolved configuration as JSON-compatible data.
    """

    # Study name and default MLflow experiment: letters, digits, '_', '.' and '-'.
    name: str
    # Absolute study directory that contains mlflow.db, ray_results and the exports.
    directory: str | None = None
    datasets: tuple[str, ...] = ("fashion_mnist",)
    models: tuple[str, ...] = ("mlp",)
    losses: tuple[str, ...] = ("ce", "ls")
    # Keyword arguments of ``build_model`` per model name, e.g. {"mlp": {"depth": 3}}.
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    tuning: TuningSpec = field(default_factory=TuningSpec)
    retrain: RetrainSpec = field(default_factory=RetrainSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    retries: RetriesSpec = field(default_factory=RetriesSpec)
    # File the study came from, for messages. It is not part of the configuration.
    source: str = field(default="<string>", compare=False, repr=False)

    def cells(self) -> list[Cell]:
        """Return every dataset x model x loss cell, dataset-major, in file order."""
        return [
            Cell(dataset, model, loss)
            for dataset in self.datasets
            for model in self.models
            for loss in self.losses
        ]

    def options_for(self, model: str) -> dict[str, Any]:
        """Return a copy of the ``build_model`` keyword arguments set for ``model``."""
        return dict(self.model_options.get(model, {}))

    @property
    def study_directory(self) -> str:
        """Absolute study directory, ``./runs/<name>`` when none was given."""
        if self.directory is not None:
            return self.directory
        return os.path.abspath(os.path.join(DEFAULT_RUNS_DIRECTORY, self.name))

    @property
    def resolved_tracking_uri(self) -> str:
        """MLflow tracking URI, the study's embedded SQLite store when none was given."""
        if self.tracking.uri is not None:
            return self.tracking.uri
        return f"sqlite:///{self.study_directory}/mlflow.db"

    @property
    def experiment_name(self) -> str:
        """MLflow experiment name, the study name when none was given."""
        return self.tracking.experiment or self.name

    @property
    def resolved_storage_path(self) -> str:
        """Ray Tune storage path or URI, ``<directory>/ray_results`` when none was given."""
        if self.storage.path is not None:
            return self.storage.path
        return os.path.join(self.study_directory, "ray_results")

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved configuration as plain JSON-compatible data.

        ``parse_study(spec.to_dict())`` returns a spec equal to ``spec``.
        """
        data = dataclasses.asdict(self)
        del data["source"]
        return _plain(data)


def _plain(value: Any) -> Any:
    """Turn tuples into lists, recursively, so the result is JSON-compatible."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# --- Reading the file -------------------------------------------------------------------


class _StudyLoader(yaml.SafeLoader):
    """Safe YAML loader that rejects duplicate keys and reads ``1e-3`` as a float.

    PyYAML follows YAML 1.1, which reads a number without a decimal point, such as
    ``1e-3``, as a string. YAML 1.2 reads it as a float, and so does this loader.
    """


def _construct_mapping_without_duplicates(
    loader: _StudyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    # Explicit keys may override merged ones (<<), so only explicit keys are compared.
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            is_duplicate = key in seen
        except TypeError:
            continue  # construct_mapping reports the unhashable key
        if is_duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}; keep only one of them", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StudyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates
)
_StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_study(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate the study file at ``path``.

    The study name defaults to the file's stem, and a relative search space path is
    resolved against the file's directory. Other relative paths (``directory``,
    ``data.root``, ``storage.path``) are resolved against the current working directory.
    An empty file is a study with every default.

    Raises:
        SpecError: the file is missing, unreadable, not YAML or not a mapping, or a value
            is invalid. The message names the file.
    """
    source = os.fspath(path)
    file_path = Path(source)

    # Read the text
    try:
        text = file_path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise SpecError(
            f"{source}: study file not found; check the path, or start from "
            "studies/fashion_mnist_demo.yaml"
        ) from err
    except IsADirectoryError as err:
        raise SpecError(
            f"{source}: is a directory, not a study file; give the path of a YAML file"
        ) from err
    except UnicodeDecodeError as err:
        raise SpecError(f"{source}: study file is not UTF-8 text; save it as UTF-8") from err
    except OSError as err:
        raise SpecError(
            f"{source}: cannot read study file ({err.strerror}); check the path and the "
            "file permissions"
        ) from err

    # Parse the YAML
    try:
        mapping = yaml.load(text, Loader=_StudyLoader)
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: invalid YAML{_describe_yaml_error(err)}") from err
    if mapping is None:
        mapping = {}

    spec = parse_study(
        mapping, source=source, base_dir=file_path.parent, default_name=file_path.stem
    )
    logger.debug("loaded study %s from %s: %d cells", spec.name, source, len(spec.cells()))
    return spec


def _describe_yaml_error(err: yaml.YAMLError) -> str:
    """Return ' at line L, column C: problem; fix ...' for a PyYAML error, on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    problem = " ".join(str(problem).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}; fix the YAML syntax there"


# --- Validation -------------------------------------------------------------------------


def parse_study(
    mapping: Any,
    source: str = "<string>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
    default_name: str | None = None,
) -> StudySpec:
    """Validate a study given as a mapping (parsed YAML) and fill in every default.

    Args:
        mapping: the top-level study mapping.
        source: the file name that messages start with.
        base_dir: directory that a relative search space path is resolved against.
            None means the current working directory.
        default_name: study name when the mapping has none, usually the file's stem.

    Raises:
        SpecError: a one-line message naming ``source``, the key path, the bad value
            and the fix.
    """
    if not isinstance(mapping, Mapping):
        raise SpecError(
            f"{source}: a study must be a mapping of keys such as name, datasets and "
            f"training, got {_describe(mapping)}; start from studies/fashion_mnist_demo.yaml"
        )
    root = _Node(source, "", mapping)
    root.reject_unknown_keys([name for name in _field_names(StudySpec) if name != "source"])
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    # Identity and output locations
    name = _parse_name(root, default_name)
    default_directory = os.path.join(DEFAULT_RUNS_DIRECTORY, name)
    directory = _absolute_path(root.string("directory", default_directory, example="runs/my-study"))

    # Cells and model options
    datasets = _parse_registered_names(root, "datasets", StudySpec.datasets)
    models = _parse_registered_names(root, "models", StudySpec.models)
    losses = _parse_registered_names(root, "losses", StudySpec.losses)
    model_options = _parse_model_options(root, models)

    # Sections: tuning needs training.epochs, tracking and storage need the directory
    training = _parse_training(root.section("training"))
    return StudySpec(
        name=name,
        directory=directory,
        datasets=datasets,
        models=models,
        losses=losses,
        model_options=model_options,
        data=_parse_data(root.section("data")),
        training=training,
        tuning=_parse_tuning(root.section("tuning"), training, base),
        retrain=_parse_retrain(root.section("retrain")),
        resources=_parse_resources(root.section("resources")),
        tracking=_parse_tracking(root.section("tracking"), name, directory),
        storage=_parse_storage(root.section("storage"), directory),
        cluster=_parse_cluster(root.section("cluster")),
        retries=_parse_retries(root.section("retries")),
        source=source,
    )


class _Node:
    """One mapping of the study file with its key path, and typed readers of its keys.

    Each reader returns the value of a key, or the given default when the key is absent,
    and raises SpecError on a value of the wrong type or range.
    """

    def __init__(self, source: str, path: str, mapping: Mapping[str, Any]) -> None:
        self.source = source
        self.path = path
        self.mapping = mapping

    def where(self, key: str) -> str:
        """Return the dotted key path of ``key``, e.g. ``training.epochs``."""
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> SpecError:
        """Build the error '<source>: <key path> <message>'."""
        return SpecError(f"{self.source}: {self.where(key)} {message}")

    def invalid(self, key: str, requirement: str, value: Any, fix: str) -> SpecError:
        """Build the error '<source>: <key path> must be <requirement>, got <value>; <fix>'."""
        return self.fail(key, f"must be {requirement}, got {_describe(value)}; {fix}")

    def reject_unknown_keys(self, known: list[str]) -> None:
        """Raise SpecError for the first key not in ``known``, suggesting the closest one."""
        for key in self.mapping:
            if key in known:
                continue
            place = f"in {self.path}" if self.path else "at top level"
            if not isinstance(key, str):
                raise SpecError(
                    f"{self.source}: key {_describe(key)} {place} is not a string; "
                    f"use one of {', '.join(known)}"
                )
            raise SpecError(f"{self.source}: unknown key '{key}' {place}; {_suggest(key, known)}")

    def section(self, key: str) -> _Node:
        """Return the nested section ``key``. An absent or empty section is an empty mapping."""
        value = self.mapping.get(key)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            fix = f"write it as '{key}: {{key: value, ...}}'"
            raise self.invalid(key, "a mapping", value, fix)
        return _Node(self.source, self.where(key), value)

    # Readers of single values

    def integer(
        self,
        key: str,
        default: int | None,
        *,
        minimum: int | None = None,
        nullable: bool = False,
        example: int | None = None,
    ) -> int | None:
        value = self.mapping.get(key, default)
        if value is None and nullable:
            return None
        requirement = _integer_requirement(minimum) + (" or null" if nullable else "")
        if example is None:
            example = default if default is not None else max(minimum or 0, 1)
        if not _is_integer(value) or (minimum is not None and value < minimum):
            raise self.invalid(key, requirement, value, f"use a value such as {example}")
        return value

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float | None = None,
        high: float | None = None,
        include_low: bool = True,
        include_high: bool = True,
    ) -> float:
        value = self.mapping.get(key, default)
        requirement = "a number" + _range_text(low, high, include_low, include_high)
        if not _is_number(value) or not _in_range(value, low, high, include_low, include_high):
            raise self.invalid(key, requirement, value, f"use a value such as {default}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.mapping.get(key, default)
        if not isinstance(value, bool):
            fix = f"write {key}: {'true' if default else 'false'}"
            raise self.invalid(key, "true or false", value, fix)
        return value

    def string(
        self, key: str, default: str | None, *, example: str, nullable: bool = False
    ) -> str | None:
        value = self.mapping.get(key, default)
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip():
            requirement = "a non-empty string" + (" or null" if nullable else "")
            raise self.invalid(key, requirement, value, f"use a value such as {example}")
        return value

    def choice(
        self,
        key: str,
        default: str | None,
        choices: tuple[str, ...] | list[str],
        *,
        nullable: bool = False,
    ) -> str | None:
        value = self.mapping.get(key, default)
        if value is None and nullable:
            return None
        if not isinstance(value, str) or value not in choices:
            options = ", ".join(choices) + (", or null" if nullable else "")
            raise self.fail(key, f"has unknown value {_describe(value)}; use one of {options}")
        return value

    def sequence(self, key: str, default: tuple[Any, ...], example: str) -> list[Any]:
        """Return the list ``key``, rejecting a scalar, a mapping and an empty list."""
        value = self.mapping.get(key, default)
        if not isinstance(value, (list, tuple)):
            raise self.invalid(key, "a list", value, f"write it as '{key}: [{example}]'")
        if not value:
            raise self.fail(key, f"is empty; list at least one value, e.g. '{key}: [{example}]'")
        return list(value)


def _suggest(key: str, known: list[str]) -> str:
    """Return 'did you mean ...?' for a misspelt key, else the list of known keys."""
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    if known:
        return f"expected one of {', '.join(known)}"
    return "remove it, because this mapping takes no keys"


def _describe(value: Any) -> str:
    """Show a value as the user wrote it in YAML, shortened to a single line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return f"a mapping {_short_repr(dict(value))}"
    if isinstance(value, (list, tuple)):
        return f"a list {_short_repr(list(value))}"
    return _short_repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = 6
_REPR.maxdict = 4


def _short_repr(value: Any) -> str:
    return " ".join(_REPR.repr(value).split())


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def _integer_requirement(minimum: int | None) -> str:
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    if minimum is None:
        return "an integer"
    return f"an integer >= {minimum}"


def _range_text(
    low: float | None, high: float | None, include_low: bool, include_high: bool
) -> str:
    """Return ' in [0, 1)', ' >= 0', ' > 0' or '' for the message of a number check."""
    if low is not None and high is not None:
        opening = "[" if include_low else "("
        closing = "]" if include_high else ")"
        return f" in {opening}{low:g}, {high:g}{closing}"
    if low is not None:
        return f" {'>=' if include_low else '>'} {low:g}"
    if high is not None:
        return f" {'<=' if include_high else '<'} {high:g}"
    return ""


def _in_range(
    value: float, low: float | None, high: float | None, include_low: bool, include_high: bool
) -> bool:
    if low is not None and (value < low or (value == low and not include_low)):
        return False
    if high is not None and (value > high or (value == high and not include_high)):
        return False
    return True


def _absolute_path(path: str) -> str:
    """Expand ``~`` and make ``path`` absolute against the current working directory."""
    return os.path.abspath(os.path.expanduser(path))


def _field_names(spec_class: type) -> list[str]:
    return [item.name for item in dataclasses.fields(spec_class)]


# --- Top-level keys ---------------------------------------------------------------------


def _parse_name(root: _Node, default_name: str | None) -> str:
    if "name" not in root.mapping and default_name is None:
        raise SpecError(f"{root.source}: name is missing; add a line such as 'name: my-study'")
    value = root.mapping.get("name", default_name)
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        origin = "" if "name" in root.mapping else " (taken from the file name)"
        raise SpecError(
            f"{root.source}: name{origin} must start with a letter or digit and contain only "
            f"letters, digits, '_', '.' and '-', got {_describe(value)}; use a name such as "
            "'fashion-mnist-demo'"
        )
    return value


def _known_datasets() -> list[str]:
    from trainables import data

    available = getattr(data, "available_datasets", None)
    return list(available()) if available is not None else sorted(data.DATASETS)


def _known_models() -> list[str]:
    from trainables.models import available_models

    return list(available_models())


def _known_losses() -> list[str]:
    from trainables.losses import available_losses

    return list(available_losses())


# Top-level list key -> function returning the registered names it may contain. The
# registries are imported when a study is parsed, so this module loads without torch.
_REGISTRIES: dict[str, Callable[[], list[str]]] = {
    "datasets": _known_datasets,
    "models": _known_models,
    "losses": _known_losses,
}


def _parse_registered_names(root: _Node, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Return the names listed under ``key``, each registered and listed once."""
    names = root.sequence(key, default, example=", ".join(default))
    known = _REGISTRIES[key]()
    singular = "loss" if key == "losses" else key[:-1]
    for name in names:
        if not isinstance(name, str) or name not in known:
            message = f"has unknown {singular} {_describe(name)}; use one of {', '.join(known)}"
            raise root.fail(key, message)
    _reject_duplicates(root, key, names)
    return tuple(names)


def _reject_duplicates(node: _Node, key: str, values: list[Any]) -> None:
    seen: list[Any] = []
    for value in values:
        if value in seen:
            raise node.fail(key, f"lists {_describe(value)} twice; list each value once")
        seen.append(value)


def _parse_model_options(root: _Node, models: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Return the ``build_model`` options per model, each option accepted by that model."""
    from trainables.models import MODELS

    options_node = root.section("model_options")
    parsed: dict[str, dict[str, Any]] = {}
    for model, options in options_node.mapping.items():
        if model not in models:
            close = difflib.get_close_matches(str(model), models, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "add it to models or remove it"
            message = (
                f"sets options for model {_describe(model)}, which is not in models "
                f"[{', '.join(models)}]; {hint}"
            )
            raise options_node.fail(str(model), message)
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            fix = f"write it as '{model}: {{option: value}}'"
            raise options_node.invalid(model, "a mapping of build_model options", options, fix)

        # Option names are the keyword-only parameters of the model's builder.
        model_node = _Node(root.source, options_node.where(model), options)
        model_node.reject_unknown_keys(list(MODELS[model].options))
        for option, value in options.items():
            if not isinstance(value, (str, int, float, bool, type(None))):
                requirement = "a single number, string, boolean or null"
                raise model_node.invalid(option, requirement, value, "give one value per option")
        parsed[model] = dict(options)
    return parsed


# --- Sections ---------------------------------------------------------------------------


def _parse_data(node: _Node) -> DataSpec:
    node.reject_unknown_keys(_field_names(DataSpec))
    defaults = DataSpec()
    root = node.string("root", defaults.root, example=DEFAULT_DATA_ROOT)
    return DataSpec(
        root=_absolute_path(root),
        download=node.boolean("download", defaults.download),
        validation_fraction=node.number(
            "validation_fraction",
            defaults.validation_fraction,
            low=0,
            high=1,
            include_low=False,
            include_high=False,
        ),
        subset=node.integer("subset", None, minimum=1, nullable=True, example=6000),
        split_seed=node.integer("split_seed", defaults.split_seed, minimum=0),
    )


def _parse_training(node: _Node) -> TrainingSpec:
    node.reject_unknown_keys(_field_names(TrainingSpec))
    defaults = TrainingSpec()
    epochs = node.integer("epochs", defaults.epochs, minimum=1)

    # Momentum: torch.optim.SGD raises for Nesterov momentum without momentum.
    momentum = node.number("momentum", defaults.momentum, low=0, high=1, include_high=False)
    nesterov = node.boolean("nesterov", defaults.nesterov)
    if nesterov and momentum == 0:
        message = "is true but momentum is 0; set momentum above 0 or nesterov: false"
        raise node.fail("nesterov", message)

    # Learning-rate schedule
    lr_decay_every = node.integer("lr_decay_every", None, minimum=1, nullable=True, example=40)
    if lr_decay_every is not None and lr_decay_every > epochs:
        message = (
            f"is {lr_decay_every}, more than training.epochs {epochs}, so the learning rate "
            f"would never decay; use at most {epochs}, or null for one fifth of the budget"
        )
        raise node.fail("lr_decay_every", message)

    return TrainingSpec(
        epochs=epochs,
        batch_size=node.integer("batch_size", defaults.batch_size, minimum=1),
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=node.number("weight_decay", defaults.weight_decay, low=0),
        lr_decay_every=lr_decay_every,
    )


def _parse_tuning(node: _Node, training: TrainingSpec, base_dir: Path) -> TuningSpec:
    from orchestrator.searchers import PRESETS

    node.reject_unknown_keys(_field_names(TuningSpec))
    defaults = TuningSpec()

    # Search: preset, space and scheduler
    search = node.choice("search", defaults.search, sorted(PRESETS))
    search_space = _parse_search_space(node, defaults.search_space, base_dir)
    scheduler = _parse_scheduler(node, search, list(PRESETS[search].schedulers))

    # Budget
    num_samples = node.integer("num_samples", defaults.num_samples, minimum=1)
    max_epochs = node.integer("max_epochs", training.epochs, minimum=1)
    if max_epochs > training.epochs:
        message = (
            f"is {max_epochs}, more than training.epochs {training.epochs}; lower it to at "
            f"most {training.epochs} or raise training.epochs"
        )
        raise node.fail("max_epochs", message)
    min_trials = node.integer("min_trials_at_budget", defaults.min_trials_at_budget, minimum=1)
    if min_trials > num_samples:
        message = (
            f"is {min_trials}, more than num_samples {num_samples}, so no budget could be "
            f"compared; use at most {num_samples}"
        )
        raise node.fail("min_trials_at_budget", message)

    # Objective
    metric = node.choice("metric", defaults.metric, list(TUNING_METRIC_MODES))
    mode = node.choice("mode", defaults.mode, MODES)
    expected_mode = TUNING_METRIC_MODES[metric]
    if mode != expected_mode:
        message = (
            f"is {mode!r}, but {metric} improves in the other direction; "
            f"use mode: {expected_mode}"
        )
        raise node.fail("mode", message)

    return TuningSpec(
        search=search,
        search_space=search_space,
        scheduler=scheduler,
        num_samples=num_samples,
        max_epochs=max_epochs,
        reduction_factor=node.number("reduction_factor", defaults.reduction_factor, low=2),
        seed=node.integer("seed", defaults.seed, minimum=0),
        max_concurrent=node.integer("max_concurrent", None, minimum=1, nullable=True, example=4),
        metric=metric,
        mode=mode,
        min_trials_at_budget=min_trials,
    )


def _parse_scheduler(node: _Node, search: str, allowed: list[str]) -> str | None:
    """Return the scheduler override, one that the search preset ``search`` supports."""
    scheduler = node.mapping.get("scheduler")
    if scheduler is None or scheduler in allowed:
        return scheduler
    message = (
        f"is {_describe(scheduler)}, which search preset '{search}' does not support; use one "
        f"of {', '.join(allowed)}, or null for the preset's default ({allowed[0]})"
    )
    raise node.fail("scheduler", message)


def _parse_search_space(node: _Node, default: str, base_dir: Path) -> str:
    """Return a built-in space name, or the absolute path of a space file that loads.

    A value that contains a path separator or ends in .yaml or .yml is a path. Any other
    value must be a built-in name.
    """
    from search_spaces import available_spaces, load_space

    value = node.string("search_space", default, example=default)
    builtin = available_spaces()
    looks_like_path = "/" in value or os.sep in value or value.endswith((".yaml", ".yml"))
    if not looks_like_path:
        if value not in builtin:
            message = (
                f"has unknown search space {value!r}; use one of {', '.join(builtin)} or the "
                "path of a search space YAML file"
            )
            raise node.fail("search_space", message)
        resolved = value
    else:
        resolved = os.path.abspath(base_dir / Path(value).expanduser())
        if not os.path.isfile(resolved):
            message = (
                f"file {value!r} not found at {resolved}; give a path relative to the study "
                f"file or one of {', '.join(builtin)}"
            )
            raise node.fail("search_space", message)
    try:
        load_space(resolved)
    except SpecError as err:
        raise node.fail("search_space", f"{value!r} is invalid: {err}") from err
    return resolved


def _parse_retrain(node: _Node) -> RetrainSpec:
    from trainables.noise import NOISE_KINDS

    node.reject_unknown_keys(_field_names(RetrainSpec))
    defaults = RetrainSpec()

    # Noise levels: each eta in [0, 1), listed once
    example = "0.0, 0.1, 0.2, 0.3"
    noise_levels = node.sequence("noise_levels", defaults.noise_levels, example=example)
    for eta in noise_levels:
        if not _is_number(eta):
            message = f"contains {_describe(eta)}, which is not a number; use a value such as 0.1"
            raise node.fail("noise_levels", message)
        if not 0 <= eta < 1:
            raise SpecError(
                f"{node.source}: {node.where('noise_levels')}: eta {eta} is outside [0, 1); "
                "use a value such as 0.1"
            )
    _reject_duplicates(node, "noise_levels", noise_levels)

    # Training seeds: non-negative integers, listed once
    seeds = node.sequence("seeds", defaults.seeds, example="0, 1, 2")
    for seed in seeds:
        if not _is_integer(seed) or seed < 0:
            message = f"contains {_describe(seed)}; use non-negative integers such as 0, 1, 2"
            raise node.fail("seeds", message)
    _reject_duplicates(node, "seeds", seeds)

    return RetrainSpec(
        noise_levels=tuple(noise_levels),
        seeds=tuple(seeds),
        noise_kind=node.choice("noise_kind", defaults.noise_kind, sorted(NOISE_KINDS)),
        noise_seed=node.integer("noise_seed", defaults.noise_seed, minimum=0),
    )


def _parse_resources(node: _Node) -> ResourcesSpec:
    node.reject_unknown_keys(_field_names(ResourcesSpec))
    defaults = ResourcesSpec()
    cpus = node.number("cpus_per_trial", defaults.cpus_per_trial, low=0, include_low=False)
    gpus = node.number("gpus_per_trial", defaults.gpus_per_trial, low=0)

    # A fraction shares one GPU between trials. Above 1, a trial would hold part of a
    # second GPU that its single training process cannot use.
    if gpus > 1 and not float(gpus).is_integer():
        message = (
            f"is {gpus}, but a trial can share one GPU or use whole GPUs; use a fraction up "
            f"to 1 such as 0.5, or a whole number such as {math.ceil(gpus)}"
        )
        raise node.fail("gpus_per_trial", message)
    return ResourcesSpec(cpus_per_trial=cpus, gpus_per_trial=gpus)


def _parse_tracking(node: _Node, name: str, directory: str) -> TrackingSpec:
    node.reject_unknown_keys(_field_names(TrackingSpec))
    uri = node.string("uri", None, example="http://HOST:5000", nullable=True)
    if uri is None:
        uri = f"sqlite:///{directory}/mlflow.db"
    elif not (_URI_SCHEME.match(uri) or uri == "databricks"):
        message = (
            f"has no scheme, got {uri!r}; use a URI such as http://HOST:5000, "
            "postgresql://USER@HOST/DB or sqlite:////absolute/path/mlflow.db"
        )
        raise node.fail("uri", message)
    experiment = node.string("experiment", None, example="my-experiment", nullable=True)
    outage_limit_s = None
    if node.mapping.get("outage_limit_s") is not None:
        outage_limit_s = float(node.number("outage_limit_s", 600.0, low=0.0, include_low=False))
    return TrackingSpec(uri=uri, experiment=experiment or name, outage_limit_s=outage_limit_s)


def _parse_storage(node: _Node, directory: str) -> StorageSpec:
    node.reject_unknown_keys(_field_names(StorageSpec))
    path = node.string("path", None, example="s3://bucket/ray_results", nullable=True)
    if path is None:
        return StorageSpec(path=os.path.join(directory, "ray_results"))
    if _URL_WITH_AUTHORITY.match(path):
        return StorageSpec(path=path)
    return StorageSpec(path=_absolute_path(path))


def _parse_cluster(node: _Node) -> ClusterSpec:
    node.reject_unknown_keys(_field_names(ClusterSpec))
    address = node.string("address", None, example="auto", nullable=True)
    if address is None or address in ("auto", "local") or _RAY_ADDRESS.fullmatch(address):
        return ClusterSpec(address=address)
    message = (
        f"is not a Ray address, got {address!r}; use auto, local, ray://HOST:10001 or "
        "HOST:PORT, or null to start a local Ray instance"
    )
    raise node.fail("address", message)


def _parse_retries(node: _Node) -> RetriesSpec:
    node.reject_unknown_keys(_field_names(RetriesSpec))
    max_failures = node.integer("max_failures", RetriesSpec().max_failures, minimum=0)
    return RetriesSpec(max_failures=max_failures)
