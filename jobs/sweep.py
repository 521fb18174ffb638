"""Run an experiment's sweep on Ray Tune, tracked in MLflow (`python jobs/sweep.py` runs the demo sweep).

    python jobs/sweep.py                                  # the demo sweep: local Ray + MLflow, CPU
    python jobs/sweep.py --config jobs/configs/table2_id_13b.yaml --dry-run
    python jobs/sweep.py --config jobs/configs/table2_id_13b.yaml --set sweep.grid.seed=[1] --name table2-s1 --dry-run
    python jobs/sweep.py --set sweep.grid.method.lora.seed=[3] --name demo-lora3   # one row's seeds
    python jobs/sweep.py --resume                         # continue the demo sweep where it stopped
    python jobs/sweep.py --resume --retry-failed          # ... and run its failed trials again

The YAML's base values are each trial's run (as `jobs/train.py` reads them); its `sweep:` section
says what varies (orchestrator/sweep/schema.py documents it). Without $RAY_ADDRESS a local Ray starts on
127.0.0.1; under `ray job submit` the job's cluster is used. Exit status: 0 all trials finished,
1 a trial failed or the sweep could not run, 2 a config or usage error (nothing was started).

One driver per sweep: a second start of a sweep that runs (`--resume` included) is refused at
once, naming the lock file and the driver that holds it. A sweep that cannot run (the cluster
too small for one trial, a scheduler setting Ray Tune refuses) is refused before its state or its
MLflow parent run exist; one that fails later ends its parent run FAILED with the reason, and
`--resume` goes on once the cause is fixed. `--resume` does not run failed trials again (a NaN
loss would fail again); `--resume --retry-failed` does, each in the same MLflow run (FAILED, then
RUNNING again), from its last checkpoint.
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
from orchestrator.config import add_overrides_option, load_experiment, shorten_message  # noqa: E402
from orchestrator.errors import SweepError  # noqa: E402

DEFAULT_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="an experiment YAML (default: jobs/configs/demo.yaml, the demo sweep)",
    )
    add_overrides_option(
        parser,
        "override a base field (adapter.sigma_p=0.1) or a sweep field (sweep.grid.seed=[1]); repeatable",
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
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: run the failed trials again, each from its last checkpoint, in the same MLflow run",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.retry_failed and not args.resume:
        parser.error(
            "--retry-failed needs --resume (it retries the failed trials of a sweep that ran)"
        )

    from orchestrator.sweep.describe import describe  # why: torch, once the arguments are valid
    from orchestrator.sweep.plan import plan_sweep  # why: as describe

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

    from orchestrator.sweep.outcome import (  # why: Ray, not for --dry-run
        mlflow_ui_hint,
        results_table,
    )
    from orchestrator.sweep.tune import run_sweep  # why: Ray, not for --dry-run
    from orchestrator.train.preflight import check_run_data  # why: tokenizers, not for --dry-run

    try:  # every trained trial's prompts fit its task.max_length: before anything starts
        for trial in plan.trials:
            if trial.tuned:
                check_run_data(trial.run)
        if plan.sweep.search == "optuna":
            check_run_data(plan.base)
    except MeLoraError as err:
        print(f"config error: {shorten_message(str(err))}", file=sys.stderr)
        return 2

    start = time.monotonic()
    try:
        outcome = run_sweep(plan, resume=args.resume, retry_failed=args.retry_failed)
    except (SweepError, MeLoraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print()
    print(results_table(outcome))
    print(
        f"\nsweep {plan.name}: {time.monotonic() - start:.0f} s; MLflow parent run {outcome.parent_run_id}"
    )
    print(f"compare the runs: {mlflow_ui_hint(plan.tracking_uri)}")
    again = " ".join(f"--set {shlex.quote(o)}" for o in args.overrides)
    again = f"python jobs/sweep.py --config {args.config} {again} --name {plan.name} --resume"
    if outcome.unfinished:
        print(
            f"{len(outcome.unfinished)} trials did not finish: continue with\n  {again}",
            file=sys.stderr,
        )
        return 1
    if outcome.failed:
        print(
            f"{len(outcome.failed)} of {len(outcome.trials)} trials failed; once the cause is "
            f"fixed, run them again with\n  {again} --retry-failed",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
