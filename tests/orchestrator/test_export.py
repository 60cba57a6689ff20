"""Tests of the Table 2 export against real MLflow stores (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from orchestrator.errors import SpecError, TrackingError
from tests.postgres import postgres_database
from orchestrator.export import (
    Table2,
    build_table,
    escape_latex,
    export_study,
    load_retrain_results,
    paper_values,
    plot_accuracy_vs_noise,
    redact_uri,
    write_table,
)

STUDY = "demo-study"
# Server for the PostgreSQL test; the admin database "test" creates and drops the test one

# Fully tuned cells: 3 seeds at two noise rates each
FULL_CELLS = [
    ("fashion_mnist", "resnet18", "ce"),
    ("fashion_mnist", "resnet18", "ls"),
    ("fashion_mnist", "mlp", "ce"),
    ("fashion_mnist", "mlp", "ls"),
]
ETAS = (0.0, 0.1)
SEEDS = (0, 1, 2)


def logged_accuracy(dataset: str, model: str, loss: str, eta: float, seed: int) -> float:
    """Test accuracy (fraction) logged for one retrain; spread over seeds grows with eta."""
    base = {"fashion_mnist": 0.92, "mnist": 0.99}[dataset]
    base -= {"resnet18": 0.0, "mlp": 0.03}[model] + {"ce": 0.0, "ls": 0.004}[loss] + 0.2 * eta
    return round(base + (seed - 1) * (0.01 + 0.05 * eta * seed), 4)


class StoreWriter:
    """Write runs shaped like the tracking module's record, for the export to read."""

    def __init__(self, uri: str, artifacts: Path) -> None:
        self.client = MlflowClient(uri)
        self.artifacts = artifacts
        self.clock = 1_700_000_000_000

    def experiment(self, name: str) -> str:
        location = (self.artifacts / name).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def run(self, experiment_id: str, tags: dict[str, str], *, parent: str | None = None,
            metrics: dict[str, float] | None = None, status: str | None = "FINISHED") -> str:
        # Strictly increasing start times keep "the later run" well defined
        self.clock += 1000
        if parent is not None:
            tags = {**tags, "mlflow.parentRunId": parent}
        run_id = self.client.create_run(experiment_id, start_time=self.clock, tags=tags).info.run_id
        if metrics:
            batch = [Metric(key, value, self.clock, 0) for key, value in metrics.items()]
            self.client.log_batch(run_id, metrics=batch)
        if status is not None:
            self.client.set_terminated(run_id, status, end_time=self.clock + 500)
        return run_id

    def retrain(self, experiment_id: str, parent: str, study: str, cell: tuple[str, str, str],
                eta: float, seed: int, accuracy: float, status: str | None = "FINISHED") -> str:
        dataset, model, loss = cell
        tags = {"study": study, "phase": "retrain", "dataset": dataset, "model": model,
                "loss": loss, "eta": str(eta), "seed": str(seed)}
        metrics = {"test_accuracy": accuracy, "nc1_train": 0.5, "noise_flip_rate": eta * 0.9}
        return self.run(experiment_id, tags, parent=parent, metrics=metrics, status=status)


def populate_store(uri: str, artifacts: Path) -> dict:
    """Log a study with finished, unfinished, deleted and foreign runs; return what counts."""
    writer = StoreWriter(uri, artifacts)
    experiment_id = writer.experiment(STUDY)
    study_run = writer.run(experiment_id, {"study": STUDY, "phase": "study"})
    values: dict[tuple[str, str, str, float, int], float] = {}
    finished: set[str] = set()

    # Fully tuned cells, each with a tune run whose metrics must not leak into the table
    for cell in FULL_CELLS:
        dataset, model, loss = cell
        cell_tags = {
            "study": STUDY, "phase": "cell", "dataset": dataset, "model": model, "loss": loss
        }
        cell_run = writer.run(experiment_id, cell_tags, parent=study_run)
        writer.run(experiment_id, {**cell_tags, "phase": "tune", "trial_id": "t1"}, parent=cell_run,
                   metrics={"test_accuracy": 0.05, "val_accuracy": 0.5})
        for eta in ETAS:
            for seed in SEEDS:
                accuracy = logged_accuracy(dataset, model, loss, eta, seed)
                values[(dataset, model, loss, eta, seed)] = accuracy
                run_id = writer.retrain(experiment_id, cell_run, STUDY, cell, eta, seed, accuracy)
                finished.add(run_id)

    # A cell with a single seed, so its standard deviation is 0.0
    single = ("mnist", "resnet18", "ce")
    single_run = writer.run(experiment_id, {"study": STUDY, "phase": "cell", "dataset": "mnist",
                                            "model": "resnet18", "loss": "ce"}, parent=study_run)
    values[(*single, 0.0, 0)] = logged_accuracy(*single, 0.0, 0)
    run_id = writer.retrain(experiment_id, single_run, STUDY, single, 0.0, 0, values[(*single, 0.0, 0)])
    finished.add(run_id)

    # Runs the export must ignore: running, failed, deleted, another study
    decoy_cell = FULL_CELLS[0]
    writer.retrain(experiment_id, study_run, STUDY, decoy_cell, 0.0, 3, 0.10, status=None)
    writer.retrain(experiment_id, study_run, STUDY, decoy_cell, 0.0, 4, 0.10, status="FAILED")
    deleted = writer.retrain(experiment_id, study_run, STUDY, decoy_cell, 0.0, 5, 0.10)
    writer.client.delete_run(deleted)
    writer.retrain(experiment_id, study_run, "other-study", decoy_cell, 0.0, 0, 0.10)

    # Malformed and duplicated retrain runs, each in an experiment of its own
    percent_id = writer.experiment("percent-study")
    writer.retrain(percent_id, study_run, "percent-study", decoy_cell, 0.0, 0, 91.2)
    untagged_id = writer.experiment("untagged-study")
    writer.run(untagged_id, {"study": "untagged-study", "phase": "retrain", "dataset": "mnist"},
               metrics={"test_accuracy": 0.9})
    duplicate_id = writer.experiment("duplicate-study")
    writer.retrain(duplicate_id, study_run, "duplicate-study", decoy_cell, 0.0, 0, 0.80)
    latest = writer.retrain(duplicate_id, study_run, "duplicate-study", decoy_cell, 0.0, 0, 0.85)
    badtag_id = writer.experiment("badtag-study")
    writer.run(badtag_id, {"study": "badtag-study", "phase": "retrain", "dataset": "mnist",
                           "model": "mlp", "loss": "ce", "eta": "ten percent", "seed": "0"},
               metrics={"test_accuracy": 0.9})
    nometric_id = writer.experiment("nometric-study")
    writer.run(nometric_id, {"study": "nometric-study", "phase": "retrain", "dataset": "mnist",
                             "model": "mlp", "loss": "ce", "eta": "0.0", "seed": "0"},
               metrics={"nc1_train": 0.5})
    quoted_id = writer.experiment("quoted-study")
    writer.retrain(quoted_id, study_run, "it's", decoy_cell, 0.0, 0, 0.75)
    writer.client.delete_experiment(writer.experiment("deleted-study"))
    writer.experiment("empty-study")

    return {"values": values, "finished": finished, "duplicate_latest": latest}


def expected_cells(values: dict) -> dict[tuple[str, str, str, float], tuple[float, float, int]]:
    """Mean and sample standard deviation (ddof=1) in percent, computed by hand."""
    groups: dict[tuple[str, str, str, float], list[float]] = {}
    for (dataset, model, loss, eta, _seed), accuracy in values.items():
        groups.setdefault((dataset, model, loss, eta), []).append(100 * accuracy)
    expected = {}
    for key, accuracies in groups.items():
        n = len(accuracies)
        mean = sum(accuracies) / n
        std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (n - 1)) if n > 1 else 0.0
        expected[key] = (mean, std, n)
    return expected


def assert_table_matches(table: Table2, values: dict) -> None:
    expected = expected_cells(values)
    assert len(table.cells) == len(expected)
    for (dataset, model, loss, eta), (mean, std, n) in expected.items():
        cell = table.cell(dataset, model, loss, eta)
        assert cell is not None, (dataset, model, loss, eta)
        assert cell.mean == pytest.approx(mean, abs=1e-9)
        assert cell.std == pytest.approx(std, abs=1e-9)
        assert cell.n == n


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    logged = populate_store(uri, root / "artifacts")
    return {"uri": uri, "root": root, **logged}


@pytest.fixture(scope="module")
def table(sqlite_store) -> Table2:
    return build_table(load_retrain_results(sqlite_store["uri"], STUDY, STUDY))


# --------------------------------------------------------------------------------------
# Reading runs


def test_load_reads_only_finished_study_retrains(sqlite_store):
    results = load_retrain_results(sqlite_store["uri"], STUDY, STUDY)

    assert {result.run_id for result in results} == sqlite_store["finished"]
    logged = {(r.dataset, r.model, r.loss, r.eta, r.seed): r.test_accuracy for r in results}
    assert logged == sqlite_store["values"]


def test_load_pages_through_runs(sqlite_store):
    paged = load_retrain_results(sqlite_store["uri"], STUDY, STUDY, page_size=2)

    assert {result.run_id for result in paged} == sqlite_store["finished"]


def test_load_keeps_latest_duplicate(sqlite_store):
    results = load_retrain_results(sqlite_store["uri"], "duplicate-study", "duplicate-study")

    assert [result.run_id for result in results] == [sqlite_store["duplicate_latest"]]
    assert results[0].test_accuracy == 0.85


def test_load_rejects_percent_accuracy(sqlite_store):
    with pytest.raises(TrackingError, match=r"test_accuracy=91\.2: expected a fraction in \[0, 1\]"):
        load_retrain_results(sqlite_store["uri"], "percent-study", "percent-study")


def test_load_rejects_missing_tags(sqlite_store):
    with pytest.raises(TrackingError, match="lacks the tags model, loss, eta, seed"):
        load_retrain_results(sqlite_store["uri"], "untagged-study", "untagged-study")


def test_load_rejects_invalid_eta_tag(sqlite_store):
    with pytest.raises(TrackingError, match="invalid tags eta='ten percent' seed='0'"):
        load_retrain_results(sqlite_store["uri"], "badtag-study", "badtag-study")


def test_load_rejects_missing_metric(sqlite_store):
    with pytest.raises(TrackingError, match="lacks the metric test_accuracy"):
        load_retrain_results(sqlite_store["uri"], "nometric-study", "nometric-study")


def test_load_study_name_with_quote(sqlite_store):
    results = load_retrain_results(sqlite_store["uri"], "quoted-study", "it's")

    assert [result.test_accuracy for result in results] == [0.75]


def test_load_rejects_both_quote_kinds(sqlite_store):
    with pytest.raises(SpecError, match="invalid study name"):
        load_retrain_results(sqlite_store["uri"], "quoted-study", "it's \"quoted\"")


def test_deleted_experiment_named(sqlite_store):
    with pytest.raises(TrackingError, match="experiment 'deleted-study' deleted in tracking store"):
        load_retrain_results(sqlite_store["uri"], "deleted-study", "deleted-study")


def test_corrupt_sqlite_file(tmp_path):
    path = tmp_path / "mlflow.db"
    path.write_text("not a database\n" * 200, encoding="utf-8")

    with pytest.raises(TrackingError, match="file is not a database") as caught:
        load_retrain_results(f"sqlite:///{path}", STUDY, STUDY)
    assert str(path) in str(caught.value)


def test_missing_experiment_named(sqlite_store):
    with pytest.raises(TrackingError) as caught:
        load_retrain_results(sqlite_store["uri"], "absent-study", STUDY)

    message = str(caught.value)
    assert "experiment 'absent-study' not found" in message
    assert sqlite_store["uri"] in message
    assert "hpo run" in message


def test_missing_sqlite_file_not_created(tmp_path):
    path = tmp_path / "typo" / "mlflow.db"

    with pytest.raises(TrackingError, match="no SQLite file at"):
        load_retrain_results(f"sqlite:///{path}", STUDY, STUDY)
    assert not path.exists()
    assert not path.parent.exists()


def test_unreachable_server_store():
    uri = "postgresql+psycopg2://postgres:secret@127.0.0.1:1/absent"
    started = time.monotonic()

    with pytest.raises(TrackingError, match="unreachable") as caught:
        load_retrain_results(uri, STUDY, STUDY)
    assert "secret" not in str(caught.value)
    assert "postgres:***@127.0.0.1:1/absent" in str(caught.value)
    assert time.monotonic() - started < 30


def test_redact_uri_hides_password():
    assert redact_uri("postgresql://user:pw@db.example:5432/mlflow") == "postgresql://user:***@db.example:5432/mlflow"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# --------------------------------------------------------------------------------------
# Aggregation


def test_table_matches_logged_values(sqlite_store, table):
    assert_table_matches(table, sqlite_store["values"])


def test_table_cell_by_hand(table):
    # Seeds 0, 1, 2 logged 0.91, 0.92, 0.93: mean 92, sample std 1 (population std 0.82)
    cell = table.cell("fashion_mnist", "resnet18", "ce", 0.0)

    assert f"{cell.mean:.2f} ± {cell.std:.2f}" == "92.00 ± 1.00"
    assert cell.n == 3


def test_single_seed_has_zero_std(table):
    cell = table.cell("mnist", "resnet18", "ce", 0.0)

    assert cell.n == 1
    assert cell.std == 0.0
    # Seed 0 logged 0.99 - 0.01
    assert cell.mean == pytest.approx(98.0)


def test_table_order_follows_paper(table):
    assert table.columns == [("mnist", "resnet18"), ("fashion_mnist", "resnet18"), ("fashion_mnist", "mlp")]
    assert table.rows == [(0.0, "ce"), (0.0, "ls"), (0.1, "ce"), (0.1, "ls")]


def test_paper_values_read_from_package():
    values = paper_values()

    assert len(values) == 64
    assert values[("fashion_mnist", "resnet18", "ce", 0.0)].mean == 92.64
    assert values[("fashion_mnist", "resnet18", "ce", 0.0)].std == 0.20
    assert values[("svhn", "vgg13", "ce", 0.3)].std == 28.37


# --------------------------------------------------------------------------------------
# Written files


def test_markdown_layout(table, tmp_path):
    text = write_table(table, tmp_path)["markdown"].read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("|")]

    assert rows[0] == "| η | loss | mnist / resnet18 | fashion_mnist / resnet18 | fashion_mnist / mlp |"
    assert rows[1] == "|---|---|:---:|:---:|:---:|"
    assert [tuple(row.split(" | ")[0:2]) for row in rows[2:]] == [
        ("| 0.0", "ce"), ("| 0.0", "ls"), ("| 0.1", "ce"), ("| 0.1", "ls")
    ]
    first = [part.strip() for part in rows[2].strip("|").split("|")]
    assert first[2:4] == ["98.00 ± 0.00 [n=1]", "92.00 ± 1.00"]
    # mnist was retrained at eta 0.0 only
    assert rows[4].split("|")[3].strip() == "–"
    assert "over 1 to 3 seeds" in text
    assert "ddof=1" in text


def test_csv_long_format(sqlite_store, table, tmp_path):
    path = write_table(table, tmp_path)["csv"]
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)

    assert reader.fieldnames == ["dataset", "model", "loss", "eta", "mean", "std", "n"]
    expected = expected_cells(sqlite_store["values"])
    assert len(rows) == len(expected)
    for row in rows:
        mean, std, n = expected[(row["dataset"], row["model"], row["loss"], float(row["eta"]))]
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-6)
        assert float(row["std"]) == pytest.approx(std, abs=1e-6)
        assert int(row["n"]) == n


def test_json_records_match_csv(table, tmp_path):
    paths = write_table(table, tmp_path)
    records = json.loads(paths["json"].read_text(encoding="utf-8"))
    with paths["csv"].open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))

    assert len(records) == len(rows) == len(table.cells)
    for record, row in zip(records, rows):
        assert {key: str(value) for key, value in record.items()} == row


def test_latex_booktabs(table, tmp_path):
    text = write_table(table, tmp_path)["latex"].read_text(encoding="utf-8")
    lines = text.splitlines()

    assert "\\begin{tabular}{llccc}" in lines
    assert lines.index("\\toprule") < lines.index("\\bottomrule")
    assert " & & \\multicolumn{1}{c}{mnist} & \\multicolumn{2}{c}{fashion\\_mnist} \\\\" in lines
    assert "\\cmidrule(lr){3-3} \\cmidrule(lr){4-5}" in lines
    assert "$\\eta$ & loss & resnet18 & resnet18 & mlp \\\\" in lines
    assert any(line.startswith("0.0 & ce & 98.00 $\\pm$ 0.00 [n=1] & 92.00 $\\pm$ 1.00 & ") for line in lines)
    assert any(line.startswith(" & ls & ") for line in lines)
    assert "fashion_mnist" not in text.replace("fashion\\_mnist", "")
    assert lines.count("\\midrule") == 2


def test_escape_latex_specials():
    assert escape_latex("a_b & 50% #1 $x$ {y} ~^\\") == (
        "a\\_b \\& 50\\% \\#1 \\$x\\$ \\{y\\} \\textasciitilde{}\\textasciicircum{}\\textbackslash{}"
    )


def test_compare_paper_markdown(table, tmp_path):
    text = write_table(table, tmp_path, compare_paper=True)["markdown"].read_text(encoding="utf-8")

    assert "92.00 ± 1.00 (paper 92.64, −0.64)" in text
    # The published Table 2 has no MLP results
    assert "(paper –)" in text


def test_compare_paper_records(table, tmp_path):
    paths = write_table(table, tmp_path, compare_paper=True)
    with paths["csv"].open(newline="", encoding="utf-8") as handle:
        rows = {(r["dataset"], r["model"], r["loss"], r["eta"]): r for r in csv.DictReader(handle)}
    records = {(r["dataset"], r["model"], r["loss"], r["eta"]): r
               for r in json.loads(paths["json"].read_text(encoding="utf-8"))}

    published = rows[("fashion_mnist", "resnet18", "ce", "0.0")]
    assert float(published["paper_mean"]) == 92.64
    assert float(published["paper_std"]) == 0.2
    assert float(published["difference"]) == pytest.approx(92.0 - 92.64, abs=1e-6)
    unpublished = rows[("fashion_mnist", "mlp", "ce", "0.0")]
    assert (unpublished["paper_mean"], unpublished["difference"]) == ("", "")
    assert records[("fashion_mnist", "mlp", "ce", 0.0)]["paper_mean"] is None
    assert records[("fashion_mnist", "resnet18", "ce", 0.0)]["paper_mean"] == 92.64


def test_compare_paper_latex(table, tmp_path):
    text = write_table(table, tmp_path, compare_paper=True)["latex"].read_text(encoding="utf-8")

    assert "92.00 $\\pm$ 1.00 (92.64, $-0.64$)" in text
    assert "(--)" in text


def test_plot_is_png(table, tmp_path):
    from matplotlib.image import imread

    path = plot_accuracy_vs_noise(table, tmp_path / "plots" / "accuracy.png")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Two datasets: two subplots of 4.5 inches at 120 dpi side by side
    assert imread(path).shape[1] == 1080


def test_plot_rejects_empty_table(tmp_path):
    with pytest.raises(ValueError, match="empty Table 2"):
        plot_accuracy_vs_noise(Table2(cells=()), tmp_path / "empty.png")


# --------------------------------------------------------------------------------------
# Whole export


def test_export_study_writes_every_file(sqlite_store, tmp_path):
    result = export_study(sqlite_store["uri"], STUDY, STUDY, tmp_path / "out", compare_paper=True)

    assert sorted(result.paths) == ["csv", "json", "latex", "markdown", "plot"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "accuracy_vs_noise.png", "table2.csv", "table2.json", "table2.md", "table2.tex"
    ]
    assert_table_matches(result.table, sqlite_store["values"])


def test_export_empty_study(sqlite_store, tmp_path):
    with pytest.raises(TrackingError) as caught:
        export_study(sqlite_store["uri"], "empty-study", "empty-study", tmp_path)

    message = str(caught.value)
    assert "no finished retrain runs for study 'empty-study' in experiment 'empty-study'" in message
    assert sqlite_store["uri"] in message
    assert "hpo run" in message
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# PostgreSQL store


@pytest.fixture(scope="module")
def postgres_uri():
    with postgres_database("hpo_export") as uri:
        yield uri


def test_export_from_postgresql(postgres_uri, tmp_path):
    logged = populate_store(postgres_uri, tmp_path / "artifacts")

    results = load_retrain_results(postgres_uri, STUDY, STUDY)
    result = export_study(postgres_uri, STUDY, STUDY, tmp_path / "out", compare_paper=True)

    assert {r.run_id for r in results} == logged["finished"]
    assert_table_matches(result.table, logged["values"])
    assert "92.00 ± 1.00 (paper 92.64, −0.64)" in result.paths["markdown"].read_text(encoding="utf-8")
