"""Render an experiment's runs from MLflow as the paper's tables and figures.

    python jobs/report.py --experiment table2_id_13b --paper          # Table 2, ours beside the paper's
    python jobs/report.py --experiment ablation_noise_13b --paper     # Tables 4 and 5
    python jobs/report.py --experiment sigma_rank_sweep               # ECE and ACC against sigma_p and r
    python jobs/report.py --experiment demo --n-samples 10 --metrics acc,ece,nll,brier

Writes <out>/report.md (the tables in Markdown, with what is missing), report.tex (LaTeX,
booktabs), runs.csv (every final metric of every run) and figures/*.png, and logs them to the
sweep's parent run under `report/`. orchestrator/report/build.py documents the rows, the N and
the paper's numbers. Exit status: 0 written, 1 no such experiment or sweep, or no finished runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from melora.errors import MeLoraError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiment", required=True, help="the MLflow experiment, or a sweep's name (--name)"
    )
    parser.add_argument(
        "--sweep",
        help="the sweep, when the experiment holds several (default: the experiment's name)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder)",
    )
    parser.add_argument(
        "--n-samples",
        default="paper",
        help="posterior samples N of the reported metrics: 'paper' (BLoB and Me-LoRA N=1, the "
        "paper's 'sampled once'; MCD and LAP N=10; LoRA and ENS N=0) or an integer for every row",
    )
    parser.add_argument(
        "--metrics",
        default="acc,ece,nll",
        help="comma-separated, from acc, ece, nll, brier, auroc, aurc, acc_cov80, mi, auroc_mi "
        "(mi and auroc_mi: sampling methods at N >= 2 only, e.g. --n-samples 10)",
    )
    parser.add_argument(
        "--paper",
        nargs="?",
        const="auto",
        metavar="TABLES",
        help="show the paper's numbers beside ours: alone, the tables matching the runs' model "
        "(13B: 2 and 3, or 4 and 5 for the noise ablation; 7B: 8 and 9); or name them, e.g. 2,3",
    )
    parser.add_argument("--out", help="output folder (default: reports/<sweep or experiment>)")
    parser.add_argument(
        "--no-log", action="store_true", help="do not log the report to the sweep's parent run"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet downloads
    # MLflow takes seconds to import: only once the arguments are read, so --help and bad
    # arguments answer at once
    from orchestrator import tracking  # why: imports MLflow (see above)
    from orchestrator.config import TrackingConfig  # why: with tracking, after the arguments
    from orchestrator.report.build import build_report, write_report  # why: imports MLflow

    try:
        n_samples = args.n_samples if args.n_samples == "paper" else int(args.n_samples)
        paper = args.paper
        if paper not in (None, "auto"):
            paper = [int(p.strip().removeprefix("table")) for p in paper.split(",") if p.strip()]
    except ValueError:
        parser.error(
            "--n-samples takes 'paper' or an integer; --paper takes table numbers like 2,3"
        )
    uri = tracking.resolve_tracking_uri(TrackingConfig(tracking_uri=args.tracking_uri))
    if (
        uri.startswith("sqlite:///")
        and not Path(uri.removeprefix("sqlite:///").split("?")[0]).is_file()
    ):
        print(f"error: no MLflow database at {uri}: pass --tracking-uri", file=sys.stderr)
        return 1
    try:
        report = build_report(
            uri,
            args.experiment,
            sweep=args.sweep,
            n_samples=n_samples,
            metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
            paper=paper,
        )
        out = Path(args.out or Path("reports") / (report.sweep or report.experiment))
        written = write_report(report, out, log=not args.no_log)
    except MeLoraError as err:  # TrackingError and ReportError are MeLoraErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.markdown())
    print(f"wrote {len(written)} files under {out}")
    if report.parent_run_id and not args.no_log:
        print(f"logged to MLflow run {report.parent_run_id} under report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
