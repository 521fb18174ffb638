"""Run an experiment's sweep on Ray Tune, tracked in MLflow (`python jobs/sweep.py` runs the demo sweep).

    python jobs/sweep.py                                  # the demo sweep: local Ray + MLflow, CPU
    python jobs/sweep.py --config jobs/configs/table2_id_13b.yaml --dry-run
    python jobs/sweep.py --config jobs/configs/table2_id_13b.yaml --set sweep.grid.seed=[1] --name table2-s1 --dry-run
    python jobs/sweep.py --set sweep.grid.method.lora.seed=[3] --name demo-lora3   # one row's seeds
    python jobs/sweep.py --resume                         # continue the demo sweep where it stopped

The YAML's base values are each trial's run (as `jobs/train.py` reads them); its `sweep:` section
says what varies (orchestrator/sweep.py documents it). Without $RAY_ADDRESS a local Ray starts on
127.0.0.1; under `ray job submit` the job's cluster is used. Exit status: 0 all trials finished,
1 a trial failed or the sweep could not run, 2 a config error (nothing was started).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from melora.errors import MeLoraError  # noqa: E402
from orchestrator.config import load_experiment, shorten_message  # noqa: E402

DEFAULT_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="an experiment YAML (default: jobs/configs/demo.yaml, the demo sweep)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base field (adapter.sigma_p=0.1) or a sweep field (sweep.grid.seed=[1]); repeatable",
    )
    parser.add_argument(
        "--name", help="the sweep's name (default: sweep.name, else the YAML file's name)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the trials and the resources each asks for; start nothing",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep of this name: finished trials are not run again",
    )
    args = parser.parse_args(argv)

    from orchestrator.sweep_config import SweepError, describe, plan_sweep

    try:
        base, section = load_experiment(args.config, args.overrides, allow_empty=False)
        plan = plan_sweep(
            base, section, name=args.name, source=args.config, overrides=args.overrides
        )
    except MeLoraError as err:
        print(f"config error: {shorten_message(str(err))}", file=sys.stderr)
        return 2
    print(describe(plan), flush=True)
    if args.dry_run:
        return 0

    from orchestrator.sweep import mlflow_ui_hint, results_table, run_sweep

    start = time.monotonic()
    try:
        outcome = run_sweep(plan, resume=args.resume)
    except (SweepError, MeLoraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print()
    print(results_table(outcome))
    print(
        f"\nsweep {plan.name}: {time.monotonic() - start:.0f} s; MLflow parent run {outcome.parent_run_id}"
    )
    print(f"compare the runs: {mlflow_ui_hint(plan.tracking_uri)}")
    if outcome.unfinished:
        again = " ".join(f"--set {shlex.quote(o)}" for o in args.overrides)
        print(
            f"{len(outcome.unfinished)} trials did not finish: continue with\n"
            f"  python jobs/sweep.py --config {args.config} {again} --name {plan.name} --resume",
            file=sys.stderr,
        )
        return 1
    if outcome.failed:
        print(f"{len(outcome.failed)} of {len(outcome.trials)} trials failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
