"""Fine-tune one (method, task, seed) on Ray Train workers with DeepSpeed, tracked in MLflow.

    python jobs/train.py --config jobs/configs/demo.yaml [--set key=value ...]

The experiment file's base values are the run; its `sweep:` section (if any) is ignored here.
Without $RAY_ADDRESS a local Ray starts on 127.0.0.1; rerunning the same run name resumes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from melora.errors import MeLoraError  # noqa: E402
from orchestrator.config import load_config, shorten_message  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", required=True, help="an experiment YAML, e.g. jobs/configs/demo.yaml"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. adapter.sigma_p=0.1 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
    except MeLoraError as err:
        print(f"config error: {shorten_message(str(err))}", file=sys.stderr)
        return 2

    from orchestrator.trainer import RunFailedError, fit_run, init_ray

    init_ray()
    try:
        result = fit_run(run)
    except (RunFailedError, MeLoraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"MLflow run {result.mlflow_run_id} at {result.tracking_uri}")
    for key in sorted(
        k for k in result.metrics if k.startswith(("test/", "ood/")) and k.endswith("_n0")
    ):
        print(f"  {key:40s} {result.metrics[key]:.4f}")
    if result.tracking_uri.startswith("sqlite:///"):
        print(f"compare runs: mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
