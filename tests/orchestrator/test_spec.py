"""Tests of the study file model: the shipped studies, defaults, paths and every bad input."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

import search_spaces
from orchestrator.errors import SpecError
from orchestrator.spec import (
    Cell,
    DataSpec,
    RetrainSpec,
    StudySpec,
    TrainingSpec,
    TuningSpec,
    load_study,
    parse_study,
)

REPOSITORY = Path(__file__).resolve().parents[2]
STUDIES = REPOSITORY / "studies"
SOURCE = "studies/x.yaml"


def _study(**overrides: Any) -> dict[str, Any]:
    return {"name": "t", **overrides}


def _spec_error(mapping: Any, *, source: str = SOURCE, **kwargs: Any) -> str:
    with pytest.raises(SpecError) as caught:
        parse_study(mapping, source=source, **kwargs)
    return str(caught.value)


def _assert_message(message: str, *fragments: str, source: str = SOURCE) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"{source}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def _table1_path() -> Path:
    path = Path(search_spaces.__file__).parent / "table1.yaml"
    assert path.is_file(), path
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- Shipped study files ----------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["fashion_mnist_demo.yaml", "paper_table2.yaml"])
def test_shipped_study_loads(file_name: str) -> None:
    spec = load_study(STUDIES / file_name)

    assert spec.source == str(STUDIES / file_name)
    assert spec.cells()
    assert spec.retrain.noise_levels == (0.0, 0.1, 0.2, 0.3)
    assert spec.retrain.seeds == (0, 1, 2)
    assert spec.tuning.search == "bohb"
    assert spec.training.weight_decay == pytest.approx(1e-3)


def test_demo_study_is_small_and_cpu_only() -> None:
    spec = load_study(STUDIES / "fashion_mnist_demo.yaml")

    assert spec.name == "fashion-mnist-demo"
    assert spec.cells() == [Cell("fashion_mnist", "mlp", "ce"), Cell("fashion_mnist", "mlp", "ls")]
    assert spec.data.subset == 6000
    assert spec.resources.gpus_per_trial == 0
    assert spec.resources.cpus_per_trial == 1
    assert spec.tuning.num_samples <= 10
    assert spec.training.epochs <= 10
    assert spec.options_for("mlp") == {"depth": 3, "width": 256}


def test_paper_study_matches_appendix_setup() -> None:
    spec = load_study(STUDIES / "paper_table2.yaml")

    assert spec.datasets == ("mnist", "fashion_mnist", "cifar10", "svhn")
    assert spec.models == ("resnet18", "vgg13")
    assert spec.losses == ("ce", "ls")
    assert len(spec.cells()) == 16
    assert spec.training == TrainingSpec(
        epochs=200,
        batch_size=512,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
        lr_decay_every=None,
    )
    assert spec.training.lr_decay_interval(200) == 40
    assert spec.tuning.num_samples == 30
    assert spec.tuning.max_epochs == 200
    assert spec.tuning.reduction_factor == 3
    assert spec.resources.gpus_per_trial == 0.25
    assert spec.resources.cpus_per_trial == 2


# --- Defaults and resolution ------------------------------------------------------------


def test_defaults_filled_in(workdir: Path) -> None:
    spec = parse_study({"name": "s"})

    assert spec.directory == str(workdir / "runs" / "s")
    assert spec.datasets == ("fashion_mnist",)
    assert spec.models == ("mlp",)
    assert spec.losses == ("ce", "ls")
    assert spec.model_options == {}
    assert spec.data == DataSpec(root=str(Path("~/.cache/hpo/data").expanduser()))
    assert spec.training == TrainingSpec()
    assert spec.tuning == TuningSpec(max_epochs=200)
    assert spec.retrain == RetrainSpec()
    assert spec.resources.cpus_per_trial == 1
    assert spec.resources.gpus_per_trial == 0
    assert spec.tracking.uri == f"sqlite:///{workdir}/runs/s/mlflow.db"
    assert spec.tracking.experiment == "s"
    assert spec.tracking.outage_limit_s is None
    assert spec.storage.path == str(workdir / "runs" / "s" / "ray_results")
    assert spec.cluster.address is None
    assert spec.retries.max_failures == 2


def test_resolved_properties(workdir: Path) -> None:
    spec = parse_study({"name": "s"})

    assert spec.resolved_tracking_uri == f"sqlite:////{str(workdir).lstrip('/')}/runs/s/mlflow.db"
    assert spec.experiment_name == "s"
    assert spec.resolved_storage_path == str(workdir / "runs" / "s" / "ray_results")
    assert spec.study_directory == str(workdir / "runs" / "s")


def test_properties_of_unparsed_spec(workdir: Path) -> None:
    spec = StudySpec(name="direct")

    assert spec.study_directory == str(workdir / "runs" / "direct")
    assert spec.resolved_tracking_uri == f"sqlite:///{workdir}/runs/direct/mlflow.db"
    assert spec.experiment_name == "direct"
    assert spec.resolved_storage_path == str(workdir / "runs" / "direct" / "ray_results")


def test_to_dict_has_every_default(workdir: Path) -> None:
    resolved = parse_study({"name": "s"}).to_dict()

    assert list(resolved) == [
        "name", "directory", "datasets", "models", "losses", "model_options", "data",
        "training", "tuning", "retrain", "resources", "tracking", "storage", "cluster", "retries",
    ]
    assert resolved["retrain"]["noise_levels"] == [0.0, 0.1, 0.2, 0.3]
    assert resolved["tuning"]["max_epochs"] == 200
    assert resolved["tracking"]["experiment"] == "s"
    assert json.loads(json.dumps(resolved)) == resolved


@pytest.mark.parametrize("file_name", ["fashion_mnist_demo.yaml", "paper_table2.yaml"])
def test_to_dict_round_trip_shipped(file_name: str) -> None:
    spec = load_study(STUDIES / file_name)

    assert parse_study(spec.to_dict()) == spec


def test_to_dict_round_trip_custom(tmp_path: Path) -> None:
    space = tmp_path / "spaces" / "mine.yaml"
    space.parent.mkdir()
    space.write_text(_table1_path().read_text())
    mapping = _study(
        directory=str(tmp_path / "out"),
        datasets=["synthetic", "fashion_mnist"],
        model_options={"mlp": {"depth": 2, "width": 32, "batch_norm": False}},
        training={"epochs": 10, "lr_decay_every": 4},
        tuning={
            "search": "skopt",
            "search_space": str(space),
            "scheduler": "asha",
            "max_concurrent": 2,
            "max_epochs": 5,
        },
        retrain={"noise_levels": [0.2], "seeds": [7], "noise_kind": "flip"},
        tracking={"uri": "http://127.0.0.1:5000", "experiment": "other", "outage_limit_s": 90},
        storage={"path": "s3://bucket/prefix"},
        cluster={"address": "ray://head:10001"},
    )
    spec = parse_study(mapping)

    assert parse_study(spec.to_dict()) == spec
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()


def test_empty_file_takes_stem_as_name(workdir: Path) -> None:
    path = workdir / "quick_run.yaml"
    path.write_text("")

    spec = load_study(path)

    assert spec.name == "quick_run"
    assert spec.directory == str(workdir / "runs" / "quick_run")


def test_cells_are_dataset_major() -> None:
    mapping = _study(datasets=["synthetic", "fashion_mnist"], models=["mlp"], losses=["ls", "ce"])

    spec = parse_study(mapping)

    assert spec.cells() == [
        Cell("synthetic", "mlp", "ls"),
        Cell("synthetic", "mlp", "ce"),
        Cell("fashion_mnist", "mlp", "ls"),
        Cell("fashion_mnist", "mlp", "ce"),
    ]
    assert str(spec.cells()[0]) == "synthetic/mlp/ls"


def test_relative_paths_resolve_against_cwd(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(workdir / "home"))
    spec = parse_study(
        _study(directory="out/study", data={"root": "~/data"}, storage={"path": "results"})
    )

    assert spec.directory == str(workdir / "out" / "study")
    assert spec.data.root == str(workdir / "home" / "data")
    assert spec.storage.path == str(workdir / "results")
    assert spec.tracking.uri == f"sqlite:///{workdir}/out/study/mlflow.db"


def test_search_space_relative_to_study_file(tmp_path: Path, workdir: Path) -> None:
    study_dir = tmp_path / "elsewhere"
    (study_dir / "spaces").mkdir(parents=True)
    (study_dir / "spaces" / "mine.yaml").write_text(_table1_path().read_text())
    study = study_dir / "s.yaml"
    study.write_text("tuning: {search_space: spaces/mine.yaml}\n")

    spec = load_study(study)

    assert spec.tuning.search_space == str(study_dir / "spaces" / "mine.yaml")


def test_builtin_search_space_kept_as_name() -> None:
    assert parse_study(_study()).tuning.search_space == "table1"


def test_exponent_without_point_is_float(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("training: {weight_decay: 5e-4}\nresources: {gpus_per_trial: 25E-2}\n")

    spec = load_study(path)

    assert spec.training.weight_decay == pytest.approx(5e-4)
    assert spec.resources.gpus_per_trial == pytest.approx(0.25)


def test_integers_accepted_as_floats() -> None:
    training = {"weight_decay": 0, "momentum": 0, "nesterov": False}

    spec = parse_study(_study(training=training, retrain={"noise_levels": [0]}))

    assert spec.training.weight_decay == 0
    assert spec.retrain.noise_levels == (0,)


def test_lr_decay_interval() -> None:
    assert TrainingSpec().lr_decay_interval(200) == 40
    assert TrainingSpec().lr_decay_interval(3) == 1
    assert TrainingSpec(lr_decay_every=7).lr_decay_interval(200) == 7


def test_fractional_cpus_and_whole_gpus() -> None:
    spec = parse_study(_study(resources={"cpus_per_trial": 1.5, "gpus_per_trial": 2}))

    assert spec.resources.cpus_per_trial == 1.5
    assert spec.resources.gpus_per_trial == 2


def test_storage_uri_kept() -> None:
    spec = parse_study(_study(storage={"path": "file:///shared/ray_results"}))

    assert spec.storage.path == "file:///shared/ray_results"


def test_spec_is_frozen() -> None:
    spec = parse_study(_study(model_options={"mlp": {"depth": 2}}))

    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]
    options = spec.options_for("mlp")
    options["depth"] = 5
    assert spec.options_for("mlp") == {"depth": 2}
    assert spec.options_for("resnet18") == {}


def test_empty_section_uses_defaults() -> None:
    assert parse_study(_study(training=None)).training == TrainingSpec()


# --- Bad input: one line naming the value and the fix -----------------------------------

BAD_STUDIES = {
    # unknown keys, with a close match or the list of keys
    "unknown top-level key": (
        _study(trainig={}),
        ["unknown key 'trainig' at top level", "did you mean 'training'?"],
    ),
    "unknown nested key": (
        _study(training={"epoch": 3}),
        ["unknown key 'epoch' in training", "did you mean 'epochs'?"],
    ),
    "unknown key without match": (
        _study(retries={"zzz": 1}),
        ["unknown key 'zzz' in retries", "expected one of max_failures"],
    ),
    "unknown model option": (
        _study(model_options={"mlp": {"dept": 3}}),
        ["unknown key 'dept' in model_options.mlp", "did you mean 'depth'?"],
    ),
    # wrong types
    "string for int": (
        _study(training={"epochs": "ten"}),
        ["training.epochs must be a positive integer, got 'ten'", "use a value such as 200"],
    ),
    "bool for int": (
        _study(training={"epochs": True}),
        ["training.epochs must be a positive integer, got true", "use a value such as 200"],
    ),
    "float for int": (
        _study(training={"batch_size": 1.5}),
        ["training.batch_size must be a positive integer, got 1.5", "such as 512"],
    ),
    "bool for float": (
        _study(training={"weight_decay": False}),
        ["training.weight_decay must be a number >= 0, got false", "such as 0.001"],
    ),
    "string for bool": (
        _study(data={"download": "yes please"}),
        ["data.download must be true or false, got 'yes please'", "write download: false"],
    ),
    "list for mapping": (
        _study(training=[1, 2]),
        [
            "training must be a mapping, got a list [1, 2]",
            "write it as 'training: {key: value, ...}'",
        ],
    ),
    "mapping for list": (
        _study(datasets={"a": 1}),
        [
            "datasets must be a list, got a mapping {'a': 1}",
            "write it as 'datasets: [fashion_mnist]'",
        ],
    ),
    "string for list": (
        _study(retrain={"seeds": "0"}),
        ["retrain.seeds must be a list, got '0'", "'seeds: [0, 1, 2]'"],
    ),
    "nan number": (
        _study(training={"momentum": float("nan")}),
        ["training.momentum must be a number in [0, 1), got nan", "such as 0.9"],
    ),
    "null for int": (
        _study(training={"epochs": None}),
        ["training.epochs must be a positive integer, got null"],
    ),
    "option value list": (
        _study(model_options={"mlp": {"depth": [3]}}),
        [
            "model_options.mlp.depth must be a single number, string, boolean or null",
            "got a list [3]",
            "give one value per option",
        ],
    ),
    "options not a mapping": (
        _study(model_options={"mlp": 3}),
        ["model_options.mlp must be a mapping of build_model options, got 3"],
    ),
    # registries
    "unknown dataset": (
        _study(datasets=["cifar100"]),
        ["datasets has unknown dataset 'cifar100'", "use one of", "cifar10", "fashion_mnist"],
    ),
    "unknown model": (
        _study(models=["resnet50"]),
        ["models has unknown model 'resnet50'", "resnet18", "vgg13"],
    ),
    "unknown loss": (_study(losses=["focal"]), ["losses has unknown loss 'focal'", "ce", "ls"]),
    "unknown preset": (
        _study(tuning={"search": "hyperopt"}),
        ["tuning.search has unknown value 'hyperopt'", "bohb", "random", "skopt"],
    ),
    "unknown scheduler": (
        _study(tuning={"search": "skopt", "scheduler": "pbt"}),
        [
            "tuning.scheduler is 'pbt', which search preset 'skopt' does not support",
            "use one of hyperband, asha, or null",
        ],
    ),
    "scheduler unsupported by preset": (
        _study(tuning={"scheduler": "asha"}),
        [
            "tuning.scheduler is 'asha', which search preset 'bohb' does not support",
            "use one of hyperband, or null",
        ],
    ),
    "unknown search space": (
        _study(tuning={"search_space": "table9"}),
        ["unknown search space 'table9'", "table1", "path of a search space YAML"],
    ),
    "missing search space file": (
        _study(tuning={"search_space": "spaces/none.yaml"}),
        ["file 'spaces/none.yaml' not found", "relative to the study file"],
    ),
    "unknown noise kind": (
        _study(retrain={"noise_kind": "pairwise"}),
        ["retrain.noise_kind has unknown value 'pairwise'", "flip", "uniform"],
    ),
    "unknown metric": (
        _study(tuning={"metric": "accuracy"}),
        ["tuning.metric has unknown value 'accuracy'", "val_accuracy"],
    ),
    "options for unlisted model": (
        _study(model_options={"vgg13": {}}),
        ["model_options.vgg13 sets options for model 'vgg13'", "add it to models or remove it"],
    ),
    "options for misspelled model": (
        _study(model_options={"mpl": {}}),
        ["model 'mpl', which is not in models [mlp]", "did you mean 'mlp'?"],
    ),
    # noise levels and seeds
    "eta 1.0": (
        _study(retrain={"noise_levels": [0.0, 1.0]}),
        ["retrain.noise_levels: eta 1.0 is outside [0, 1)", "use a value such as 0.1"],
    ),
    "eta -0.1": (
        _study(retrain={"noise_levels": [-0.1]}),
        ["retrain.noise_levels: eta -0.1 is outside [0, 1)", "use a value such as 0.1"],
    ),
    "eta 1.2": (
        _study(retrain={"noise_levels": [1.2]}),
        ["retrain.noise_levels: eta 1.2 is outside [0, 1)", "use a value such as 0.1"],
    ),
    "eta string": (
        _study(retrain={"noise_levels": ["low"]}),
        ["retrain.noise_levels contains 'low', which is not a number", "such as 0.1"],
    ),
    "empty noise levels": (
        _study(retrain={"noise_levels": []}),
        ["retrain.noise_levels is empty", "'noise_levels: [0.0, 0.1, 0.2, 0.3]'"],
    ),
    "duplicate noise levels": (
        _study(retrain={"noise_levels": [0, 0.0]}),
        ["retrain.noise_levels lists 0.0 twice", "list each value once"],
    ),
    "empty seeds": (
        _study(retrain={"seeds": []}),
        ["retrain.seeds is empty", "'seeds: [0, 1, 2]'"],
    ),
    "duplicate seeds": (
        _study(retrain={"seeds": [0, 1, 1]}),
        ["retrain.seeds lists 1 twice", "list each value once"],
    ),
    "negative seed": (
        _study(retrain={"seeds": [-1]}),
        ["retrain.seeds contains -1", "use non-negative integers"],
    ),
    "bool seed": (
        _study(retrain={"seeds": [True]}),
        ["retrain.seeds contains true", "use non-negative integers"],
    ),
    "empty datasets": (_study(datasets=[]), ["datasets is empty", "'datasets: [fashion_mnist]'"]),
    "duplicate losses": (
        _study(losses=["ce", "ce"]),
        ["losses lists 'ce' twice", "list each value once"],
    ),
    # budgets and ranges
    "max_epochs above epochs": (
        _study(training={"epochs": 10}, tuning={"max_epochs": 20}),
        ["tuning.max_epochs is 20, more than training.epochs 10", "lower it to at most 10"],
    ),
    "min trials above samples": (
        _study(tuning={"num_samples": 3, "min_trials_at_budget": 4}),
        ["tuning.min_trials_at_budget is 4, more than num_samples 3", "use at most 3"],
    ),
    "mode against metric": (
        _study(tuning={"metric": "val_loss"}),
        ["tuning.mode is 'max'", "use mode: min"],
    ),
    "reduction factor 1": (
        _study(tuning={"reduction_factor": 1}),
        ["tuning.reduction_factor must be a number >= 2, got 1", "such as 3"],
    ),
    "zero samples": (
        _study(tuning={"num_samples": 0}),
        ["tuning.num_samples must be a positive integer, got 0", "such as 30"],
    ),
    "zero max concurrent": (
        _study(tuning={"max_concurrent": 0}),
        ["tuning.max_concurrent must be a positive integer or null, got 0"],
    ),
    "lr decay beyond epochs": (
        _study(training={"epochs": 10, "lr_decay_every": 11}),
        ["training.lr_decay_every is 11", "use at most 10"],
    ),
    "momentum 1": (
        _study(training={"momentum": 1.0}),
        ["training.momentum must be a number in [0, 1), got 1.0", "such as 0.9"],
    ),
    "nesterov without momentum": (
        _study(training={"momentum": 0}),
        ["training.nesterov is true but momentum is 0", "nesterov: false"],
    ),
    "validation fraction 1": (
        _study(data={"validation_fraction": 1}),
        ["data.validation_fraction must be a number in (0, 1), got 1", "such as 0.2"],
    ),
    "validation fraction 0": (
        _study(data={"validation_fraction": 0.0}),
        ["data.validation_fraction must be a number in (0, 1), got 0.0"],
    ),
    "zero subset": (
        _study(data={"subset": 0}),
        ["data.subset must be a positive integer or null, got 0", "such as 6000"],
    ),
    "negative split seed": (
        _study(data={"split_seed": -3}),
        ["data.split_seed must be a non-negative integer, got -3", "such as 0"],
    ),
    "negative max failures": (
        _study(retries={"max_failures": -1}),
        ["retries.max_failures must be a non-negative integer, got -1", "such as 2"],
    ),
    # resources
    "negative cpus": (
        _study(resources={"cpus_per_trial": -1}),
        ["resources.cpus_per_trial must be a number > 0, got -1", "such as 1"],
    ),
    "zero cpus": (
        _study(resources={"cpus_per_trial": 0}),
        ["resources.cpus_per_trial must be a number > 0, got 0"],
    ),
    "negative gpus": (
        _study(resources={"gpus_per_trial": -0.5}),
        ["resources.gpus_per_trial must be a number >= 0, got -0.5", "such as 0"],
    ),
    "fractional gpus above 1": (
        _study(resources={"gpus_per_trial": 1.5}),
        ["resources.gpus_per_trial is 1.5", "whole number such as 2"],
    ),
    # names, addresses and URIs
    "name with space": (
        {"name": "my study"},
        ["name must start with a letter or digit", "got 'my study'", "'fashion-mnist-demo'"],
    ),
    "name with leading dash": ({"name": "-x"}, ["got '-x'"]),
    "name not a string": ({"name": 12}, ["got 12"]),
    "missing name": ({}, ["name is missing", "'name: my-study'"]),
    "tracking uri without scheme": (
        _study(tracking={"uri": "mlruns"}),
        ["tracking.uri has no scheme, got 'mlruns'", "http://HOST:5000"],
    ),
    "outage limit zero": (
        _study(tracking={"outage_limit_s": 0}),
        ["tracking.outage_limit_s must be a number > 0, got 0", "600"],
    ),
    "outage limit text": (
        _study(tracking={"outage_limit_s": "ten minutes"}),
        ["tracking.outage_limit_s must be a number > 0, got 'ten minutes'"],
    ),
    "empty experiment": (
        _study(tracking={"experiment": ""}),
        ["tracking.experiment must be a non-empty string or null, got ''"],
    ),
    "bad cluster address": (
        _study(cluster={"address": "head node"}),
        ["cluster.address is not a Ray address, got 'head node'", "ray://HOST:10001"],
    ),
    "key not a string": ({"name": "t", 3: 1}, ["key 3 at top level is not a string", "use one of name"]),
    "not a mapping": (
        [1, 2],
        ["a study must be a mapping", "got a list [1, 2]", "studies/fashion_mnist_demo.yaml"],
    ),
}


@pytest.mark.parametrize("mapping, fragments", list(BAD_STUDIES.values()), ids=list(BAD_STUDIES))
def test_bad_study_rejected(mapping: Any, fragments: list[str]) -> None:
    _assert_message(_spec_error(mapping), *fragments)


def test_invalid_search_space_file(tmp_path: Path) -> None:
    space = tmp_path / "broken.yaml"
    space.write_text("parameters: 3\n")

    message = _spec_error(_study(tuning={"search_space": "broken.yaml"}), base_dir=tmp_path)

    _assert_message(message, "tuning.search_space 'broken.yaml' is invalid")


def test_invalid_name_from_stem(tmp_path: Path) -> None:
    path = tmp_path / "my study.yaml"
    path.write_text("datasets: [fashion_mnist]\n")

    with pytest.raises(SpecError) as caught:
        load_study(path)

    message = str(caught.value)
    _assert_message(message, "name (taken from the file name)", "'my study'", source=str(path))


# --- Bad files ----------------------------------------------------------------------------


def _load_error(path: Path) -> str:
    with pytest.raises(SpecError) as caught:
        load_study(path)
    return str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    _assert_message(_load_error(path), "study file not found", "check the path", source=str(path))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    message = _load_error(tmp_path)

    _assert_message(message, "is a directory", "give the path of a YAML file", source=str(tmp_path))


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntraining: {epochs: 3\n")

    message = _load_error(path)

    _assert_message(message, "invalid YAML at line", "fix the YAML syntax there", source=str(path))


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("training: {epochs: 3}\ntraining: {epochs: 4}\n")

    message = _load_error(path)

    _assert_message(message, "line 2", "duplicate key 'training'", "keep only one", source=str(path))


def test_yaml_merge_key_not_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("training:\n  <<: {epochs: 3, batch_size: 64}\n  epochs: 4\n")

    spec = load_study(path)

    assert spec.training.epochs == 4
    assert spec.training.batch_size == 64


def test_yaml_list_file(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n")

    _assert_message(_load_error(path), "a study must be a mapping", "got a list", source=str(path))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))

    _assert_message(_load_error(path), "not UTF-8 text", "save it as UTF-8", source=str(path))


def test_path_below_a_file(tmp_path: Path) -> None:
    parent = tmp_path / "plain.txt"
    parent.write_text("")
    path = parent / "s.yaml"

    message = _load_error(path)

    _assert_message(message, "cannot read study file", "check the path", source=str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.yaml"
    path.write_text("name: x\n")
    path.chmod(0)

    message = _load_error(path)

    _assert_message(message, "cannot read study file", "check the path", source=str(path))
