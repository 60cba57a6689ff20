"""The ``hpo`` command: run, plan, resume and export studies, browse MLflow, use clusters.

Every error the service raises on purpose (``HpoError``) is printed as one line on
standard error, and the process exits with the error's exit code: 2 for bad input found
before any work started, 1 for work that failed. ``--verbose`` adds the traceback.

Commands that run a study (``run``, ``resume``) turn SIGINT and SIGTERM into a clean stop.
The runs in progress are marked KILLED and the Ray instance the study started is shut down.
The command prints how to resume and exits with 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from orchestrator.errors import HpoError
from orchestrator.reliability import StopSignals, StudyInterrupted

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="hpo",
        description="Tune, retrain under label noise and tabulate deep networks on Ray and MLflow.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages and print tracebacks"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from orchestrator import commands, submit

    commands.add_parsers(subparsers)
    submit.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hpo`` command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # MLflow announces schema creation and migrations at INFO; the service logs its own steps.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    stop_signals = StopSignals() if getattr(args, "stop_signals", False) else contextlib.nullcontext()
    try:
        with stop_signals:
            return int(args.handler(args) or 0)
    except StudyInterrupted as err:
        print(f"hpo {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except HpoError as err:
        if args.verbose:
            logger.exception("command failed")
        print(f"hpo {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"hpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
