"""`python -m smet_lab.report`: a sweep's stability report, or the ablation tables.

    python -m smet_lab.report TARGET [--tracking-uri URI] [--out DIR] [--no-log]
        TARGET: a sweep name (its newest parent run), a sweep's folder (sweeps/NAME), an MLflow
        experiment name, or a parent run id. A sweep the database does not know (tracking=none, or
        its database elsewhere) is read from its folder's own files (a name: sweeps/NAME).
        Writes report.md, report.html, tables (.md/.csv/.tex) and plots (.png) into DIR (default:
        <sweep_dir>/report/ when the sweep's folder is on this machine, else reports/<name>/) and logs
        the folder as the parent run's artifact report/ (unless --no-log).
    python -m smet_lab.report RUN_FOLDER [RUN_FOLDER ...] [--out DIR]
        Single runs' output folders (outputs/<date>/<time>-<method>), read from their files, compared as
        one report's cells (default DIR: <run>/report/ for one, reports/runs-<hash>/ for several).
    python -m smet_lab.report --tables [SPEC.yaml ...] [--tracking-uri URI] [--out DIR]
        Renders each table spec (default: the shipped smet_lab/report/table_specs/*.yaml) as Markdown,
        CSV and LaTeX into DIR (default: analysis/tables/ in the working directory).

Bad input (unknown sweep, empty experiment, missing database, bad spec): one line
`smet_lab: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smet_lab.stopping import clean_exit

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the main CLI, instead of usage + message
        print(f"smet_lab: error: {message} (see python -m smet_lab.report --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m smet_lab.report", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("target", nargs="*", help="sweep name, sweep folder, MLflow experiment name or parent run id; "
                                             "or one or more single runs' output folders")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent MLflow run")
    p.add_argument("--tables", nargs="*", metavar="SPEC", default=None,
                   help="render table specs (default: the shipped ones) instead of a report")
    return p


def fail(message: str) -> int:
    print(f"smet_lab: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


@clean_exit
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from smet_lab.config import ConfigError, check_writable_dir
    from smet_lab.report.io import ReportError
    from smet_lab.tracking.settings import TrackingConfig, check_tracking, quiet_mlflow

    quiet_mlflow()
    from smet_lab.report.specs import SpecError

    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        MlflowException = RuntimeError  # noqa: N806

    try:
        if not args.tracking_uri.startswith("sqlite:"):  # a server that does not answer: seconds, not MLflow's retries
            try:
                check_tracking(TrackingConfig(uri=args.tracking_uri))
            except ConfigError as exc:
                raise ConfigError("--tracking-uri", exc.value, exc.allowed) from None
        if args.out:
            check_writable_dir("--out", args.out)
        if args.tables is not None:
            return tables(args)
        if not args.target:
            from smet_lab.report.io import known_sweeps

            return fail("give a sweep name, a sweep folder, an experiment name, a parent run id or run folders "
                        "(or --tables)"
                        + known_sweeps(args.tracking_uri))
        from smet_lab.report.build import report_for_target

        info, out = report_for_target(args.tracking_uri, args.target, args.out, log=not args.no_log,
                                      warn=lambda line: print(f"smet_lab: warning: {line}", file=sys.stderr))
    except (ReportError, SpecError) as exc:
        return fail(str(exc))
    except ConfigError as exc:
        return fail(f"{exc.key} {exc.value}: {exc.allowed}")
    except MlflowException as exc:
        return fail(f"MLflow ({args.tracking_uri}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    where = (f"; logged to parent run {info.parent_run_id} as report/" if info.parent_run_id and not args.no_log
             else f" (read from its folder's files: {args.tracking_uri} does not have it)" if info.from_folder
             else " (read from the runs' folders)" if info.run_dirs else "")
    what = info.name if info.kind == "runs" else f"{info.kind} {info.name}"  # "2 runs", "sweep density"
    print(f"smet_lab: report of {what}: {out / 'report.html'}{where}")
    return 0


def tables(args) -> int:
    from smet_lab.report.specs import SPECS_DIR, default_specs, render_tables

    specs = [Path(p) for p in args.tables] or default_specs()
    if not specs:
        return fail(f"no table specs given and none in {SPECS_DIR}")
    out = Path(args.out) if args.out else Path("analysis") / "tables"
    for p in render_tables(args.tracking_uri, specs, out, warn=lambda m: print(m, file=sys.stderr)):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
