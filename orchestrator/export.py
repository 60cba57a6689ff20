"""Table 2 (test accuracy under label noise) and its plot, built from MLflow retrain runs.

The paper's Table 2 (Nguyen et al., "Memorization-Dilation: Modeling Neural Collapse
Under Label Noise", ICLR 2023) reports the test accuracy in percent, as mean and standard
deviation over seeds, for every dataset x model x loss x label-noise rate eta. This
module reads the FINISHED retrain runs of a study from MLflow, aggregates them the same
way and writes the table as Markdown, CSV, LaTeX and JSON, optionally beside the
published values, plus a plot of accuracy against eta.

It only reads from MLflow; logging the written files as artifacts is done by the tracking
module.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import logging
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import SpecError, TrackingError
from orchestrator.tracking import redact_uri

__all__ = [
    "DATASET_ORDER",
    "LOSS_ORDER",
    "MODEL_ORDER",
    "ExportResult",
    "PaperValue",
    "RetrainResult",
    "Table2",
    "Table2Cell",
    "build_table",
    "export_study",
    "load_retrain_results",
    "paper_values",
    "plot_accuracy_vs_noise",
    "write_table",
]

logger = logging.getLogger(__name__)

# Row and column order of the paper's Table 2. Names not listed follow alphabetically.
DATASET_ORDER = ("mnist", "fashion_mnist", "cifar10", "svhn")
MODEL_ORDER = ("resnet18", "vgg13", "mlp")
LOSS_ORDER = ("ce", "ls", "lr", "mse")

# Decimals kept in the machine-readable CSV and JSON files (the tables show two).
STORED_DECIMALS = 6

MISSING = "–"
PAPER_FILE = "data/paper_table2.csv"
PAPER_SOURCE = (
    "Nguyen, Levie, Lienen, Kutyniok, Huellermeier, ICLR 2023, appendix Table 2"
)


# --------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class RetrainResult:
    """One retrain run: a tuned configuration trained under label noise and tested.

    ``eta`` is the label-noise rate, ``seed`` the training seed and ``test_accuracy`` the
    accuracy on the clean test set as a fraction in [0, 1].
    """

    dataset: str
    model: str
    loss: str
    eta: float
    seed: int
    test_accuracy: float
    run_id: str


@dataclass(frozen=True)
class Table2Cell:
    """Test accuracy in percent of one dataset x model x loss x eta over ``n`` seeds.

    ``std`` is the sample standard deviation (ddof=1), and 0.0 when ``n`` is 1.
    """

    dataset: str
    model: str
    loss: str
    eta: float
    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class PaperValue:
    """Published test accuracy in percent: mean and standard deviation over 3 seeds."""

    mean: float
    std: float


@dataclass(frozen=True)
class Table2:
    """Aggregated test accuracies, in the row and column order of the paper's Table 2.

    Rows are eta (ascending) x loss and columns are dataset x model. Only combinations
    with at least one cell appear.
    """

    cells: tuple[Table2Cell, ...]

    @property
    def columns(self) -> list[tuple[str, str]]:
        """(dataset, model) pairs, dataset-major in ``DATASET_ORDER`` then ``MODEL_ORDER``."""
        pairs = {(cell.dataset, cell.model) for cell in self.cells}
        return sorted(
            pairs, key=lambda pair: (_order(DATASET_ORDER, pair[0]), _order(MODEL_ORDER, pair[1]))
        )

    @property
    def rows(self) -> list[tuple[float, str]]:
        """(eta, loss) pairs, eta ascending, then losses in ``LOSS_ORDER``."""
        pairs = {(cell.eta, cell.loss) for cell in self.cells}
        return sorted(pairs, key=lambda pair: (pair[0], _order(LOSS_ORDER, pair[1])))

    def cell(self, dataset: str, model: str, loss: str, eta: float) -> Table2Cell | None:
        """Return the cell of one combination, or None when it was not measured."""
        key = (dataset, model, loss, _eta_key(eta))
        for cell in self.cells:
            if _cell_key(cell) == key:
                return cell
        return None


@dataclass(frozen=True)
class ExportResult:
    """Table built by ``export_study`` and the files written, by format name."""

    table: Table2
    paths: dict[str, Path]


def _order(known: Sequence[str], name: str) -> tuple[int, str]:
    return (known.index(name) if name in known else len(known), name)


def _eta_key(eta: float) -> float:
    # Tags store eta as text ("0.1"), so compare values rounded well below any real step
    return round(float(eta), 6)


def _cell_key(cell: Table2Cell | RetrainResult) -> tuple[str, str, str, float]:
    return (cell.dataset, cell.model, cell.loss, _eta_key(cell.eta))


# --------------------------------------------------------------------------------------
# Reading MLflow


def load_retrain_results(
    tracking_uri: str, experiment: str, study: str, *, page_size: int = 1000
) -> list[RetrainResult]:
    """Read the FINISHED retrain runs of ``study`` from ``experiment`` in MLflow.

    Runs are selected by the tags ``phase=retrain`` and ``study=<study>``. Runs that are
    RUNNING, FAILED, KILLED or deleted are skipped. When several finished runs share a
    dataset, model, loss, eta and seed, the one started last is kept. ``page_size`` is
    the number of runs fetched per request.

    Raises ``TrackingError`` when the store is unreachable, the experiment does not exist
    or a retrain run lacks a tag or a valid ``test_accuracy`` metric, and ``SpecError``
    for a study name that contains both single and double quotes.
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    # Check the store first, because MLflow retries an unreachable database for ~100 s
    shown_uri = redact_uri(tracking_uri)
    check_store_readable(tracking_uri)

    # Find the experiment
    with _tracking_errors(f"reading experiment {experiment!r} from {shown_uri}"):
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        state = "not found" if found is None else "deleted"
        raise TrackingError(
            f"experiment {experiment!r} {state} in tracking store {shown_uri}: run the study "
            "first (hpo run STUDY_FILE) or pass the experiment name the study logged to"
        )

    # Page through the finished retrain runs of the study
    filter_string = (
        f"tags.phase = 'retrain' AND tags.study = {_quote_filter_value(study)} "
        "AND attributes.status = 'FINISHED'"
    )
    runs = []
    page_token = None
    with _tracking_errors(f"searching runs of experiment {experiment!r} in {shown_uri}"):
        while True:
            page = client.search_runs(
                [found.experiment_id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=page_size,
                order_by=["attributes.start_time ASC"],
                page_token=page_token,
            )
            runs.extend(page)
            page_token = page.token
            if not page_token:
                break
    logger.debug("found %d finished retrain runs of study %s", len(runs), study)

    # Convert the runs, keeping the latest of duplicated ones
    runs.sort(key=lambda run: (run.info.start_time or 0, run.info.run_id))
    latest: dict[tuple[str, str, str, float, int], RetrainResult] = {}
    for run in runs:
        result = _to_retrain_result(run, experiment)
        key = (*_cell_key(result), result.seed)
        if key in latest:
            logger.warning(
                "retrain runs %s and %s of study %s both cover %s; using the later run %s "
                "(delete the other run to silence this warning)",
                latest[key].run_id,
                result.run_id,
                study,
                key,
                result.run_id,
            )
        latest[key] = result
    return list(latest.values())


def check_store_readable(tracking_uri: str) -> None:
    """Check that a database-backed tracking store exists and accepts connections, without retries.

    MLflow (3.17, ``create_sqlalchemy_engine_with_retry``) retries a failing database
    connection 10 times with exponential backoff, about 100 seconds in all, before it
    reports the error.

    SQLite stores must exist already (MLflow would create an empty one at a mistyped
    path). PostgreSQL and MySQL stores must accept a connection within 10 seconds.
    Other schemes (http, file, databricks) are left to MLflow.

    Raises ``TrackingError`` naming the URI, with its password hidden.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        backend = make_url(tracking_uri).get_backend_name()
    except ArgumentError:
        return
    probe = _STORE_PROBES.get(backend)
    if probe is not None:
        probe(tracking_uri)


def _probe_sqlite(tracking_uri: str) -> None:
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database
    if database and database != ":memory:" and not Path(database).is_file():
        raise TrackingError(
            f"tracking store {tracking_uri} not found: no SQLite file at "
            f"{Path(database).resolve()}; pass the URI the study logged to "
            "(by default sqlite:///<study dir>/mlflow.db)"
        )


def _probe_server_database(tracking_uri: str) -> None:
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    engine = sqlalchemy.create_engine(tracking_uri, connect_args={"connect_timeout": 10})
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", err)).strip().splitlines()[0]
        raise TrackingError(
            f"tracking store {redact_uri(tracking_uri)} unreachable ({reason}): start the "
            "database server or fix the tracking URI"
        ) from err
    finally:
        engine.dispose()


# Store checks by SQLAlchemy backend name
_STORE_PROBES: dict[str, Callable[[str], None]] = {
    "sqlite": _probe_sqlite,
    "postgresql": _probe_server_database,
    "mysql": _probe_server_database,
}


@contextmanager
def _tracking_errors(action: str) -> Iterator[None]:
    """Turn MLflow and database failures into a one-line ``TrackingError``."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(
            f"{action} failed ({reason}): check that the URI points to a running MLflow tracking store"
        ) from err


def _quote_filter_value(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise SpecError(
        f"invalid study name {value!r}: MLflow filters cannot match a name that contains both "
        "single and double quotes; rename the study"
    )


def _to_retrain_result(run: Any, experiment: str) -> RetrainResult:
    """Build a ``RetrainResult`` from an MLflow run, checking its tags and metric."""
    run_id = run.info.run_id
    where = f"retrain run {run_id} in experiment {experiment!r}"
    tags = run.data.tags
    missing = [name for name in ("dataset", "model", "loss", "eta", "seed") if name not in tags]
    if missing:
        raise TrackingError(
            f"{where} lacks the tags {', '.join(missing)}: delete the run and resume the study"
        )
    try:
        eta = float(tags["eta"])
        seed = int(tags["seed"])
    except ValueError as err:
        raise TrackingError(
            f"{where} has invalid tags eta={tags['eta']!r} seed={tags['seed']!r}: expected a "
            "number and an integer such as 0.1 and 0; delete the run and resume the study"
        ) from err

    accuracy = run.data.metrics.get("test_accuracy")
    if accuracy is None:
        raise TrackingError(
            f"{where} lacks the metric test_accuracy: delete the run and resume the study"
        )
    if not 0.0 <= accuracy <= 1.0:
        raise TrackingError(
            f"{where} has test_accuracy={accuracy!r}: expected a fraction in [0, 1], "
            "not a percentage; delete the run and resume the study"
        )
    return RetrainResult(
        dataset=tags["dataset"],
        model=tags["model"],
        loss=tags["loss"],
        eta=eta,
        seed=seed,
        test_accuracy=float(accuracy),
        run_id=run_id,
    )


# --------------------------------------------------------------------------------------
# Aggregation and published values


def build_table(results: Iterable[RetrainResult]) -> Table2:
    """Aggregate retrain results into Table 2 cells, in percent.

    Per dataset, model, loss and eta: the mean over seeds and the sample standard
    deviation (ddof=1, as ``statistics.stdev``), which is 0.0 for a single seed.
    """
    groups: dict[tuple[str, str, str, float], list[float]] = {}
    for result in results:
        groups.setdefault(_cell_key(result), []).append(100.0 * result.test_accuracy)

    cells = []
    for (dataset, model, loss, eta), accuracies in groups.items():
        std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        cells.append(
            Table2Cell(
                dataset=dataset,
                model=model,
                loss=loss,
                eta=eta,
                mean=statistics.fmean(accuracies),
                std=std,
                n=len(accuracies),
            )
        )
    cells.sort(
        key=lambda cell: (
            _order(DATASET_ORDER, cell.dataset),
            _order(MODEL_ORDER, cell.model),
            _order(LOSS_ORDER, cell.loss),
            cell.eta,
        )
    )
    return Table2(cells=tuple(cells))


def paper_values() -> dict[tuple[str, str, str, float], PaperValue]:
    """Read the published Table 2 shipped with the package.

    Keys are (dataset, model, loss, eta) and values are in percent. The paper publishes
    only ResNet-18 and VGG-13 with the losses ce and ls.
    """
    text = importlib.resources.files("orchestrator").joinpath(PAPER_FILE).read_text("utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    values = {}
    for row in csv.DictReader(lines):
        key = (row["dataset"], row["model"], row["loss"], _eta_key(float(row["eta"])))
        values[key] = PaperValue(mean=float(row["mean"]), std=float(row["std"]))
    return values


# --------------------------------------------------------------------------------------
# Writing the table


def write_table(
    table: Table2, out_dir: str | Path, *, compare_paper: bool = False
) -> dict[str, Path]:
    """Write ``table`` as table2.md, table2.csv, table2.tex and table2.json in ``out_dir``.

    The Markdown and LaTeX files show "mean ± std" with two decimals. The CSV (long
    format) and JSON (list of records) files have one record per cell with the fields
    dataset, model, loss, eta, mean, std and n, rounded to 6 decimals. With
    ``compare_paper`` each table cell also shows the published mean and our mean minus
    it, and the records gain paper_mean, paper_std and difference (empty or null where
    the paper has no value).

    Returns the written paths by format name: markdown, csv, latex, json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paper = paper_values() if compare_paper else None

    paths = {
        "markdown": out_dir / "table2.md",
        "csv": out_dir / "table2.csv",
        "latex": out_dir / "table2.tex",
        "json": out_dir / "table2.json",
    }
    records = _records(table, paper)
    paths["markdown"].write_text(_render_markdown(table, paper), encoding="utf-8")
    _write_csv(records, paths["csv"])
    paths["latex"].write_text(_render_latex(table, paper), encoding="utf-8")
    paths["json"].write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    logger.debug("wrote Table 2 with %d cells to %s", len(table.cells), out_dir)
    return paths


def _records(
    table: Table2, paper: Mapping[tuple[str, str, str, float], PaperValue] | None
) -> list[dict[str, Any]]:
    records = []
    for cell in table.cells:
        record = asdict(cell)
        record["mean"] = round(cell.mean, STORED_DECIMALS)
        record["std"] = round(cell.std, STORED_DECIMALS)
        if paper is not None:
            published = paper.get(_cell_key(cell))
            record["paper_mean"] = published.mean if published else None
            record["paper_std"] = published.std if published else None
            record["difference"] = (
                round(cell.mean - published.mean, STORED_DECIMALS) if published else None
            )
        records.append(record)
    return records


def _write_csv(records: list[dict[str, Any]], path: Path) -> None:
    fields = ["dataset", "model", "loss", "eta", "mean", "std", "n"]
    if records and "paper_mean" in records[0]:
        fields += ["paper_mean", "paper_std", "difference"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for record in records:
            writer.writerow({name: "" if record[name] is None else record[name] for name in fields})


def _format_difference(difference: float, minus: str) -> str:
    rounded = round(difference, 2)
    if rounded == 0:
        return "0.00"
    return f"+{rounded:.2f}" if rounded > 0 else f"{minus}{abs(rounded):.2f}"


def _seed_caption(table: Table2) -> tuple[str, int]:
    """Describe the seed counts and return the maximum seed count of any cell."""
    counts = sorted({cell.n for cell in table.cells})
    if not counts:
        return "no seeds", 0
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] > 1 else ''}", counts[0]
    return f"{counts[0]} to {counts[-1]} seeds ([n=k] marks cells with fewer)", counts[-1]


def _render_markdown(
    table: Table2, paper: Mapping[tuple[str, str, str, float], PaperValue] | None
) -> str:
    seeds, max_seeds = _seed_caption(table)
    lines = [
        "# Table 2: test accuracy (%) under label noise",
        "",
        f"Mean ± sample standard deviation (ddof=1) over {seeds}; η is the label-noise rate.",
    ]
    if paper is not None:
        lines.append(
            f"In brackets: the published mean ({PAPER_SOURCE}) and our mean minus it, "
            f"in percentage points; {MISSING} where the paper has no value."
        )
    lines.append("")

    # Header: one column per dataset and model
    columns = table.columns
    header = ["η", "loss"] + [f"{dataset} / {model}" for dataset, model in columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---"] + [":---:"] * len(columns)) + "|")

    # Body: one row per noise rate and loss
    for eta, loss in table.rows:
        row = [str(eta), loss]
        for dataset, model in columns:
            cell = table.cell(dataset, model, loss, eta)
            row.append(_markdown_cell(cell, paper, max_seeds))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cell(
    cell: Table2Cell | None,
    paper: Mapping[tuple[str, str, str, float], PaperValue] | None,
    max_seeds: int,
) -> str:
    if cell is None:
        return MISSING
    text = f"{cell.mean:.2f} ± {cell.std:.2f}"
    if cell.n < max_seeds:
        text += f" [n={cell.n}]"
    if paper is not None:
        published = paper.get(_cell_key(cell))
        if published is None:
            text += f" (paper {MISSING})"
        else:
            difference = _format_difference(cell.mean - published.mean, "−")
            text += f" (paper {published.mean:.2f}, {difference})"
    return text


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def escape_latex(text: str) -> str:
    """Escape the characters that LaTeX treats specially, such as ``_`` and ``&``."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def _render_latex(
    table: Table2, paper: Mapping[tuple[str, str, str, float], PaperValue] | None
) -> str:
    columns = table.columns
    seeds, max_seeds = _seed_caption(table)
    lines = [
        f"% Table 2: test accuracy (%) under label noise, mean $\\pm$ sample standard "
        f"deviation (ddof=1) over {escape_latex(seeds)}.",
    ]
    if paper is not None:
        lines.append(
            f"% In brackets: published mean ({PAPER_SOURCE}) and our mean minus it."
        )
    lines += [
        "\\begin{tabular}{ll" + "c" * len(columns) + "}",
        "\\toprule",
    ]

    # Two header rows: datasets spanning their models, then the models
    groups: list[tuple[str, int]] = []
    for dataset, _ in columns:
        if groups and groups[-1][0] == dataset:
            groups[-1] = (dataset, groups[-1][1] + 1)
        else:
            groups.append((dataset, 1))
    spans = [
        f"\\multicolumn{{{width}}}{{c}}{{{escape_latex(dataset)}}}" for dataset, width in groups
    ]
    lines.append(" & & " + " & ".join(spans) + " \\\\")
    rules, first = [], 3
    for _, width in groups:
        rules.append(f"\\cmidrule(lr){{{first}-{first + width - 1}}}")
        first += width
    lines.append(" ".join(rules))
    models = [escape_latex(model) for _, model in columns]
    lines.append("$\\eta$ & loss & " + " & ".join(models) + " \\\\")

    # Body: a rule between noise rates, the rate written once per group
    previous_eta = None
    for eta, loss in table.rows:
        if eta != previous_eta:
            lines.append("\\midrule")
        eta_text = str(eta) if eta != previous_eta else ""
        cells = [
            _latex_cell(table.cell(dataset, model, loss, eta), paper, max_seeds)
            for dataset, model in columns
        ]
        lines.append(f"{eta_text} & {escape_latex(loss)} & " + " & ".join(cells) + " \\\\")
        previous_eta = eta
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _latex_cell(
    cell: Table2Cell | None,
    paper: Mapping[tuple[str, str, str, float], PaperValue] | None,
    max_seeds: int,
) -> str:
    if cell is None:
        return "--"
    text = f"{cell.mean:.2f} $\\pm$ {cell.std:.2f}"
    if cell.n < max_seeds:
        text += f" [n={cell.n}]"
    if paper is not None:
        published = paper.get(_cell_key(cell))
        if published is None:
            text += " (--)"
        else:
            difference = _format_difference(cell.mean - published.mean, "-")
            text += f" ({published.mean:.2f}, ${difference}$)"
    return text


# --------------------------------------------------------------------------------------
# Plot


def plot_accuracy_vs_noise(table: Table2, path: str | Path) -> Path:
    """Plot test accuracy (%) against eta as a PNG and return its path.

    The figure has one subplot per dataset and one line per loss and model, with error
    bars of one standard deviation.

    Uses matplotlib's Agg canvas directly, so no display and no pyplot state are needed.
    Raises ``ValueError`` for a table without cells.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not table.cells:
        raise ValueError(
            "cannot plot an empty Table 2: export a study with finished retrain runs"
        )
    datasets = list(dict.fromkeys(dataset for dataset, _ in table.columns))
    figure = Figure(figsize=(4.5 * len(datasets), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(datasets), squeeze=False, sharex=True)[0]
    etas = sorted({cell.eta for cell in table.cells})

    # One line per loss and model, eta ascending
    for axis, dataset in zip(axes, datasets):
        models = [model for name, model in table.columns if name == dataset]
        losses = sorted(
            {cell.loss for cell in table.cells}, key=lambda loss: _order(LOSS_ORDER, loss)
        )
        for model in models:
            for loss in losses:
                line = sorted(
                    (
                        cell
                        for cell in table.cells
                        if (cell.dataset, cell.model, cell.loss) == (dataset, model, loss)
                    ),
                    key=lambda cell: cell.eta,
                )
                if not line:
                    continue
                axis.errorbar(
                    [cell.eta for cell in line],
                    [cell.mean for cell in line],
                    yerr=[cell.std for cell in line],
                    marker="o",
                    capsize=3,
                    label=f"{model} {loss}",
                )
        axis.set_title(dataset)
        axis.set_xticks(etas)
        axis.set_xlabel("label-noise rate η")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


# --------------------------------------------------------------------------------------
# Whole export


def export_study(
    tracking_uri: str,
    experiment: str,
    study: str,
    out_dir: str | Path,
    *,
    compare_paper: bool = False,
) -> ExportResult:
    """Read a study's retrain runs, then write Table 2 in every format and the plot.

    Writes table2.{md,csv,tex,json} and accuracy_vs_noise.png into ``out_dir``. See
    ``write_table`` for ``compare_paper``.

    Raises ``TrackingError`` when the store or experiment is missing or the study has no
    finished retrain run.
    """
    results = load_retrain_results(tracking_uri, experiment, study)
    if not results:
        raise TrackingError(
            f"no finished retrain runs for study {study!r} in experiment {experiment!r} at "
            f"{redact_uri(tracking_uri)}: run the study first (hpo run STUDY_FILE)"
        )

    table = build_table(results)
    paths = write_table(table, out_dir, compare_paper=compare_paper)
    paths["plot"] = plot_accuracy_vs_noise(table, Path(out_dir) / "accuracy_vs_noise.png")
    logger.info(
        "exported Table 2 of study %s: %d cells from %d retrain runs to %s",
        study,
        len(table.cells),
        len(results),
        out_dir,
    )
    return ExportResult(table=table, paths=paths)
