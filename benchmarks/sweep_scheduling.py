"""The paper's full grid (13B and 7B tables) on a simulated GPU cluster: makespan and utilisation.

    .venv/bin/python benchmarks/sweep_scheduling.py                        # 8 nodes x 8 GPUs, ~2.5 min
    .venv/bin/python benchmarks/sweep_scheduling.py --order longest-first --boolq-factor 5

Every experiment YAML of the paper's tables is planned with the real `plan_sweep` (trial list,
each trial's driver CPU and num_workers x {GPU, CPU}); the trials of all of them form one combined
queue (one sweep, in YAML order unless --order says otherwise) run through the real
`orchestrator.sweep.tune.run_sweep`: Tune, the same concurrency rule (`max_concurrent` over
`ray.cluster_resources()`), the same per-trial driver reservation, MLflow in a temporary folder.
Only the trial body is swapped (run_sweep's `trainable=`): a placeholder that asks Ray for the
trial's workers as a placement group (num_workers bundles of {GPU: 1, CPU: c}, as a TorchTrainer's
workers hold them), sleeps for the trial's estimated duration scaled down, and releases them.

Ray starts on this machine with logical resources only (--nodes x --gpus-per-node GPUs and
--cpus-per-node CPUs each, declared as one Ray node): nothing uses a real GPU, no model is loaded,
torch is never imported in a trial. ENS trials are left out: they train nothing (the sweep averages
their members' predictions after Tune). A trial's estimated duration is README's GPU-hours assumption:
max_steps x step time (0.6 s Llama2-13B, 0.35 s Llama2-7B, on 4 GPUs) x 1.1 (validation every 100
steps, final evaluation, start-up); --boolq-factor scales BoolQ trials (README: about 5x in the
paper's own times; 1 by default, as in README's table).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

CONFIGS = (
    "table2_id_13b",
    "table3_ood_13b",
    "ablation_noise_13b",
    "table8_id_7b",
    "table9_ood_7b",
)
STEP_TIME = {"13b": 0.6, "7b": 0.35}  # seconds per step on 4 GPUs: README "GPU-hours per table"


def model_size(name_or_path: str) -> str:
    low = name_or_path.lower()
    for size in ("13b", "7b"):
        if size in low:
            return size
    raise SystemExit(f"no step time for model {name_or_path!r}: only Llama2-13B and -7B are known")


def assumed_hours(run, step_time: dict[str, float], overhead: float) -> float:
    """One trial's duration under the assumed step time: max_steps x step time x (1 + overhead)."""
    return (
        run.optim.max_steps * step_time[model_size(run.model.name_or_path)] * (1 + overhead) / 3600
    )


def make_placeholder(table: dict[str, dict]):
    """A Tune function trainable with train_trial's signature that only holds the trial's workers.

    `table`: run name -> {"seconds": sleep, "bundles": the workers' resources, "gpus": total}.
    Imports nothing of the project (no torch): it travels by value to the trial's process.
    """

    def placeholder_trial(config, sweep_data):
        import os
        import time

        import ray
        from ray import tune
        from ray.util.placement_group import placement_group, remove_placement_group

        spec = table[config["trial"]]
        entered = time.time()
        pg = placement_group(spec["bundles"], strategy="PACK")  # Train V2's default for workers
        ray.get(pg.ready())
        start = time.time()
        time.sleep(spec["seconds"])
        end = time.time()
        remove_placement_group(pg)
        tune.report(
            {
                "entered": entered,
                "start": start,
                "end": end,
                "gpus": spec["gpus"],
                "pid": os.getpid(),
            }
        )

    return placeholder_trial


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan of greedy list scheduling in queue order on identical slots (no overhead)."""
    free = [0.0] * slots
    end = 0.0
    for d in durations:
        t = heapq.heappop(free)
        heapq.heappush(free, t + d)
        end = max(end, t + d)
    return end


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help="YAMLs under jobs/configs")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-node", type=int, default=96, help="p4de.24xlarge: 96 vCPUs")
    p.add_argument("--step-time-13b", type=float, default=STEP_TIME["13b"])
    p.add_argument("--step-time-7b", type=float, default=STEP_TIME["7b"])
    p.add_argument("--overhead", type=float, default=0.1, help="eval + start-up, as README: 10%%")
    p.add_argument("--boolq-factor", type=float, default=1.0)
    p.add_argument(
        "--seconds-per-hour", type=float, default=12.0, help="time scale: 1 real hour -> N s"
    )
    p.add_argument("--order", choices=("yaml", "longest-first"), default="yaml")
    args = p.parse_args(argv)

    from orchestrator.config import load_experiment
    from orchestrator.sweep.plan import plan_sweep

    tmp = Path(tempfile.mkdtemp(prefix="sweep_scheduling_"))
    overrides = [
        f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",  # never the repo's mlflow.db
        f"tracking.storage_path={tmp}/ray_results",
    ]
    step_time = {"13b": args.step_time_13b, "7b": args.step_time_7b}
    plans, hours = [], {}
    for name in args.configs:
        path = REPO / "jobs" / "configs" / f"{name}.yaml"
        base, section = load_experiment(str(path), overrides)
        plan = plan_sweep(base, section, source=str(path))
        plans.append(plan)
        for t in plan.trials:
            h = assumed_hours(t.run, step_time, args.overhead)
            if t.run.task.name == "boolq":
                h *= args.boolq_factor
            hours[t.name] = h
    first = plans[0]
    for plan in plans[1:]:  # one combined queue needs one sweep section's rules
        for key in ("search", "scheduler", "driver_cpus", "max_concurrent_trials"):
            if getattr(plan.sweep, key) != getattr(first.sweep, key):
                raise SystemExit(f"{plan.name}: sweep.{key} differs from {first.name}'s")
    trials = [t for plan in plans for t in plan.trials if t.tuned]  # ENS trials train nothing
    if args.order == "longest-first":
        trials.sort(key=lambda t: -hours[t.name])  # stable: YAML order among equals
    combined = dataclasses.replace(first, name="paper_grid_sim", trials=trials)

    table, gpu_hours = {}, 0.0
    for t in trials:
        res = combined.trial_resources(t.run)
        per = t.run.scaling.resources_per_worker()
        table[t.name] = {
            "seconds": hours[t.name] * args.seconds_per_hour,
            "bundles": [dict(per) for _ in range(t.run.scaling.num_workers)],
            "gpus": res.get("GPU", 0.0),
        }
        gpu_hours += hours[t.name] * res.get("GPU", 0.0)
    gpus = args.nodes * args.gpus_per_node
    cpus = args.nodes * args.cpus_per_node

    import ray

    ray.init(
        num_cpus=cpus,
        num_gpus=gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=200 * 1024**2,
    )
    from orchestrator.sweep.tune import run_sweep

    slots = combined.max_concurrent(ray.cluster_resources())
    wall0 = time.time()
    run_sweep(combined, trainable=make_placeholder(table), evaluate_ensembles=False)
    wall = time.time() - wall0

    from ray import tune

    results = [t.last_result for t in tune.ExperimentAnalysis(str(combined.sweep_dir)).trials]
    done = [r for r in results if r and "end" in r]
    ray.shutdown()
    t0 = min(r["entered"] for r in done)
    makespan_s = max(r["end"] for r in done) - t0
    held = sum((r["end"] - r["start"]) * r["gpus"] for r in done) / args.seconds_per_hour
    makespan = makespan_s / args.seconds_per_hour
    ideal = gpu_hours / gpus
    gpus_per_trial = max(v["gpus"] for v in table.values())
    policy = list_schedule([hours[t.name] for t in trials], slots)
    lpt = list_schedule(sorted((hours[t.name] for t in trials), reverse=True), slots)

    shape = {
        (t.run.scaling.num_workers, tuple(sorted(t.run.scaling.resources_per_worker().items())))
        for t in trials
    }
    print()
    print(
        f"simulated cluster: {args.nodes} nodes x {args.gpus_per_node} GPUs = {gpus} GPUs, {cpus} CPUs "
        "(logical resources, one Ray node on this machine)"
    )
    print(
        f"assumed step time on 4 GPUs: 13B {args.step_time_13b} s, 7B {args.step_time_7b} s, "
        f"x {1 + args.overhead:g} (eval, start-up); BoolQ x {args.boolq_factor:g}; "
        f"time scale 1 h -> {args.seconds_per_hour:g} s"
    )
    print(
        "queue: all experiments as one combined sweep, order "
        f"{args.order}, trained trials (ENS trials train nothing): "
        + ", ".join(f"{p.name} {sum(t.tuned for t in p.trials)}" for p in plans)
    )
    for n, per in sorted(shape):
        print(
            f"trial shape: driver {{CPU: {combined.sweep.driver_cpus:g}}} + {n} workers x {dict(per)}"
        )
    print(f"concurrency (max_concurrent_trials auto, from cluster resources): {slots} trials")
    print(f"trials: {len(trials)} ({len(done)} ran to the end)")
    print(f"total GPU-time: {gpu_hours:.1f} GPU-h (held in simulation: {held:.1f} GPU-h)")
    print(f"ideal lower bound (GPU-time / {gpus} GPUs): {ideal:.2f} h")
    print(
        f"list schedule, same order, {slots} slots of {gpus_per_trial:g} GPUs, no overhead: "
        f"{policy:.2f} h (utilisation {gpu_hours / (gpus * policy):.1%}); longest first: "
        f"{lpt:.2f} h ({gpu_hours / (gpus * lpt):.1%})"
    )
    print(
        f"simulated makespan: {makespan:.2f} h ({makespan_s:.1f} s measured; "
        f"run_sweep wall {wall:.1f} s)"
    )
    util = gpu_hours / (gpus * makespan)
    # where the gap to the list schedule goes: the first wave's process start-up (one per slot,
    # started a few at a time on this 2-core machine) and each later trial's hand-over in the
    # same reused trial process (previous end -> next entry)
    first_wave = sorted(r["entered"] for r in done)[:slots]
    startup = first_wave[-1] - first_wave[0]
    by_pid: dict[int, list[dict]] = {}
    for r in done:
        by_pid.setdefault(r["pid"], []).append(r)
    gaps = []
    for rs in by_pid.values():
        rs.sort(key=lambda r: r["entered"])
        gaps += [b["entered"] - a["end"] for a, b in zip(rs, rs[1:], strict=False)]
    # each trial process's span, from its first trial's entry to its last trial's end: the
    # sweep's makespan had every process started at once (a lower estimate: the early processes
    # took on the trials the late ones would have run)
    span = max(max(r["end"] for r in rs) - rs[0]["entered"] for rs in by_pid.values())
    steady = span / args.seconds_per_hour
    print(
        f"cluster utilisation (GPU-time / (GPUs x makespan)): {util:.1%} "
        f"({'meets' if util >= 0.9 else 'below'} the 90% target)"
    )
    print(
        f"Ray/Tune overhead: makespan - list schedule = {(makespan - policy) * 60:.0f} min simulated "
        f"({(makespan - policy) * args.seconds_per_hour:.1f} s real)"
    )
    print(
        f"  of which: first wave start-up {startup:.1f} s real (the {slots} trial processes start "
        f"a few at a time here); hand-over between trials in a reused process: mean "
        f"{sum(gaps) / max(len(gaps), 1):.2f} s, max {max(gaps, default=0):.2f} s real, "
        f"over {len(gaps)} hand-overs in {len(by_pid)} processes"
    )
    print(
        f"without the start-up (longest trial-process span): makespan {steady:.2f} h, "
        f"utilisation {gpu_hours / (gpus * steady):.1%}"
    )
    print(f"(scratch: {tmp}; MLflow and Tune state there, nothing in the repo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
