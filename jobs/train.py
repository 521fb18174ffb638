"""Fine-tune one (method, task, seed) on Ray Train workers with DeepSpeed, tracked in MLflow.

    python jobs/train.py --config jobs/configs/demo.yaml [--set key=value ...]

The experiment file's base values are the run; its `sweep:` section (if any) is ignored here.
Without $RAY_ADDRESS a local Ray starts on 127.0.0.1.

Rerunning a run name (its Ray Train folder <tracking.storage_path>/<name> keeps the MLflow run id):
- a run that did not finish (killed, FAILED) resumes from its last checkpoint in the same MLflow run;
- a FINISHED run with the same config is not trained again: its metrics are printed (exit 0);
- a run made with another config (e.g. another adapter.sigma_p) is refused, naming the changed
  params, before anything changes in MLflow (exit 2): give the new config another name
  (--set name=...), or delete the run's Ray Train folder to train it as a new MLflow run.
A FINISHED run never changes status. While a run trains, a second start of it is refused.
Exit status: 0 trained (or finished before), 1 the run failed or could not start, 2 a config error
or a refused rerun (nothing was started).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

from melora.errors import MeLoraError  # noqa: E402
from orchestrator.config import add_overrides_option, load_config, shorten_message  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", required=True, help="an experiment YAML, e.g. jobs/configs/demo.yaml"
    )
    add_overrides_option(
        parser,
        "override a field, e.g. adapter.sigma_p=0.1 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
    except MeLoraError as err:
        print(f"config error: {shorten_message(str(err))}", file=sys.stderr)
        return 2

    # why here: torch, Ray and the tokenizers load only once the config is known to be valid
    from orchestrator.errors import RunConflictError, RunFailedError
    from orchestrator.train.preflight import check_run_data
    from orchestrator.train.run_marker import run_lock
    from orchestrator.train.trainer import finished_run, fit_run, init_ray

    try:  # the prompts fit task.max_length, the answers are tokens: before anything is written
        check_run_data(run)
    except MeLoraError as err:
        print(f"config error: {shorten_message(str(err))}", file=sys.stderr)
        return 2
    try:
        with run_lock(run):
            result = finished_run(run)  # before Ray starts: a finished run has nothing to do
            if result is not None:
                print(
                    f"run {run.run_name} finished before (MLflow run {result.mlflow_run_id}): "
                    "not trained again"
                )
            else:
                init_ray()
                result = fit_run(run)
    except RunConflictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RunFailedError, MeLoraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"MLflow run {result.mlflow_run_id} at {result.tracking_uri}")
    for key in sorted(
        k for k in result.metrics if k.startswith(("test/", "ood/")) and k.endswith("_n0")
    ):
        print(f"  {key:40s} {result.metrics[key]:.4f}")
    if result.model_id:
        print(
            f"MLflow model models:/{result.model_id}; ask it: python jobs/predict.py --model "
            f"models:/{result.model_id} --input questions.jsonl"
        )
    if result.tracking_uri.startswith("sqlite:///"):
        print(f"compare runs: mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
