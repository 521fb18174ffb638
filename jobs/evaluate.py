"""Evaluate finished runs post hoc as new MLflow runs: LAP around a MAP adapter, or an ensemble.

    python jobs/evaluate.py --laplace <MLflow run id> [--set laplace.link_approx=probit ...]
    python jobs/evaluate.py --ensemble <run id> <run id> <run id> [--seed 1]

--laplace: KFAC Laplace around the adapter of a finished `lora` (or `lap`) run, e.g. one trained
under ZeRO-3, where LAP cannot run inside the trial; the new run has method=lap and the tag
`map_run`. --ensemble: the average of finished LoRA runs that differ only in their seed; the new
run has method=ens and the tag `ensemble_members`. Both run in this process with the base model
whole (on a GPU when the runs used one and one is visible). The tracking URI is --tracking-uri,
else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from melora.errors import MeLoraError  # noqa: E402
from orchestrator.config import TrackingConfig, add_overrides_option, parse_overrides  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--laplace", metavar="RUN_ID", help="a finished lora (MAP) run")
    what.add_argument(
        "--ensemble", metavar="RUN_ID", nargs="+", help="finished LoRA runs (the members)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="--ensemble: the ENS seed the run is tagged with"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI)"
    )
    add_overrides_option(
        parser,
        "override a field of the new run, e.g. laplace.prior_tuning=gridsearch (repeatable)",
    )
    args = parser.parse_args(argv)
    from orchestrator import tracking

    try:
        uri = tracking.resolve_tracking_uri(TrackingConfig(tracking_uri=args.tracking_uri))
        overrides = dict(parse_overrides(args.overrides))
        if args.laplace:
            from orchestrator.posthoc.laplace import laplace_from_run

            result = laplace_from_run(args.laplace, uri, overrides)
        else:
            result = _ensemble(uri, args.ensemble, args.seed, overrides)
    except MeLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"MLflow run {result.mlflow_run_id} at {tracking.redact_uri(result.tracking_uri)}")
    for key in sorted(k for k in result.metrics if k.startswith(("test/", "ood/", "lap/"))):
        print(f"  {key:40s} {result.metrics[key]:.4f}")
    return 0


def _ensemble(uri: str, member_run_ids: list[str], seed: int, overrides: dict):
    """The ENS run of the given members: the first member's config, method ens, `seed`."""
    from orchestrator.posthoc.ensemble import evaluate_ensemble_run
    from orchestrator.posthoc.runs import finished_run_config

    with tempfile.TemporaryDirectory() as tmp:
        first = finished_run_config(uri, member_run_ids[0], tmp)
    ens = {"adapter.method": "ens", "seed": seed, "name": None, "tracking.tracking_uri": uri}
    run = first.with_overrides(ens).with_overrides(overrides)
    return evaluate_ensemble_run(run, member_run_ids)


if __name__ == "__main__":
    sys.exit(main())
