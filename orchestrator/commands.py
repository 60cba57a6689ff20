"""Handlers of the study commands: ``run``, ``resume``, ``plan``, ``export`` and ``ui``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.errors import SpecError
from orchestrator.spec import StudySpec, load_study, parse_study

logger = logging.getLogger(__name__)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the study commands on the ``hpo`` parser."""
    run = subparsers.add_parser(
        "run", help="run a study: tune, retrain under label noise, export Table 2",
        description="Run a study file end to end. Results go to MLflow; tables to <study dir>/export.",
    )
    run.add_argument("study", help="study file (YAML)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run of this study instead of refusing to start")
    run.set_defaults(handler=handle_run, stop_signals=True)

    resume = subparsers.add_parser(
        "resume", help="continue an interrupted study from its directory",
        description="Continue the study whose directory (with study.json) is given.",
    )
    resume.add_argument("directory", help="study directory, e.g. runs/fashion-mnist-demo")
    resume.set_defaults(handler=handle_resume, stop_signals=True)

    plan = subparsers.add_parser(
        "plan", help="print what a run would do, without training",
        description="Print cells, trials, Hyperband brackets and epochs per phase of a study.",
    )
    plan.add_argument("study", help="study file (YAML)")
    plan.set_defaults(handler=handle_plan)

    export = subparsers.add_parser(
        "export", help="write Table 2 (Markdown, CSV, LaTeX, JSON) and a plot from MLflow",
        description="Read the finished retrain runs of a study from MLflow and write Table 2.",
    )
    export.add_argument("study", help="study file (YAML) whose tracking store and name are used")
    export.add_argument("--out", help="output directory (default: <study dir>/export)")
    export.add_argument("--tracking-uri",
                        help="read from this MLflow tracking URI instead of the study's own, e.g. "
                             "the published address of a cluster's MLflow server")
    export.add_argument("--compare-paper", action="store_true",
                        help="add the published value and the difference to each cell")
    export.set_defaults(handler=handle_export)

    ui = subparsers.add_parser(
        "ui", help="open the MLflow UI on a study's tracking store",
        description="Start 'mlflow ui' on the study's store; stop it with Ctrl-C.",
    )
    ui.add_argument("study", help="study file (YAML)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port to bind (default: 5000)")
    ui.set_defaults(handler=handle_ui)


def handle_run(args: argparse.Namespace) -> int:
    from orchestrator.study import run_study

    spec = load_study(args.study)
    summary = run_study(spec, resume=args.resume)
    print(summary.format())
    return 0


def handle_resume(args: argparse.Namespace) -> int:
    from orchestrator.study import run_study

    spec = load_from_directory(args.directory)
    summary = run_study(spec, resume=True)
    print(summary.format())
    return 0


def load_from_directory(directory: str) -> StudySpec:
    """Load the resolved study that ``hpo run`` saved as ``study.json`` in its directory."""
    path = Path(directory).expanduser() / "study.json"
    if not path.is_file():
        raise SpecError(
            f"{path} not found; give the directory of a study started with 'hpo run' "
            "(it holds study.json), or run 'hpo run STUDY --resume' with the study file"
        )
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpecError(f"cannot read {path}: {err}; restore it or resume with the study file") from err
    return parse_study(mapping, source=str(path))


def handle_plan(args: argparse.Namespace) -> int:
    from orchestrator.plan import format_plan, plan_study
    from orchestrator.preflight import load_cell_spaces

    spec = load_study(args.study)
    load_cell_spaces(spec)
    print(format_plan(spec, plan_study(spec)))
    return 0


def handle_export(args: argparse.Namespace) -> int:
    from orchestrator.export import export_study

    spec = load_study(args.study)
    out_dir = Path(args.out) if args.out else Path(spec.study_directory) / "export"
    uri = args.tracking_uri or spec.resolved_tracking_uri
    result = export_study(uri, spec.experiment_name, spec.name, out_dir, compare_paper=args.compare_paper)
    for kind, path in sorted(result.paths.items()):
        print(f"{kind}: {path}")
    return 0


def handle_ui(args: argparse.Namespace) -> int:
    spec = load_study(args.study)
    uri = spec.resolved_tracking_uri
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port)]
    if uri.startswith("sqlite:///"):
        command += ["--default-artifact-root", (Path(spec.study_directory) / "mlartifacts").as_uri()]
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri} (Ctrl-C stops it)")
    return subprocess.call(command, env=dict(os.environ))
