"""GPU-hours of the paper's tables, from the step times the paper measured (its Table 6).

    .venv/bin/python benchmarks/gpu_hours.py            # the README's "GPU-hours per table"

Every experiment YAML of the paper's tables is planned with the real `plan_sweep`; each trained
trial costs the paper's own measured time for its model, method and training task (Table 6: 5,000
steps on one GPU, an RTX A40 for Llama2-13B and an RTX 3090 for Llama2-7B), scaled by the
trial's max_steps. LoRA's time stands for MAP, MCD, LAP's MAP training and the ENS members (the
same LoRA training); BLoB and Me-LoRA have their own. ENS trials train nothing (their members'
probabilities are averaged). Not counted, because Table 6 does not measure them: LAP's Laplace fit
and predictive, the final evaluation at N = 0, 1, 10 and the OOD sets.

The second estimate is the one benchmarks/sweep_scheduling.py simulates: 4-GPU ZeRO-3 trials at an
assumed step time (no GPU has been lent to this project to measure it), plus 10% for evaluation
and start-up. Nothing here starts Ray or a model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.sweep_scheduling import CONFIGS, STEP_TIME, assumed_hours, model_size  # noqa: E402

TABLE_OF = {
    "table2_id_13b": "2",
    "table3_ood_13b": "3",
    "ablation_noise_13b": "4, 5",
    "table8_id_7b": "8",
    "table9_ood_7b": "9",
}
TABLE6_MODEL = {"13b": "Llama2-13B", "7b": "Llama2-7B"}  # benchmarks.sweep_scheduling.model_size
TABLE6_METHOD = {"lora": "LoRA", "mcd": "LoRA", "lap": "LoRA", "blob": "BLoB", "melora": "Me-LoRA"}


def trial_seconds(run) -> float:
    """The paper's measured single-GPU training time of this trial (Table 6, scaled by its steps)."""
    from orchestrator.report.paper_tables import TABLE6_SECONDS, TABLE6_STEPS

    model = TABLE6_MODEL[model_size(run.model.name_or_path)]
    times = TABLE6_SECONDS[(model, TABLE6_METHOD[run.adapter.method])]
    if run.task.name not in times:
        raise SystemExit(f"Table 6 has no time for task {run.task.name!r}")
    return times[run.task.name] * run.optim.max_steps / TABLE6_STEPS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help="YAMLs under jobs/configs")
    p.add_argument("--overhead", type=float, default=0.1, help="the assumed estimate's eval share")
    args = p.parse_args(argv)

    from orchestrator.config import load_experiment
    from orchestrator.report.paper_tables import TABLE6_GPU
    from orchestrator.sweep.plan import plan_sweep

    rows, totals = [], [0, 0, 0.0, 0.0]
    for name in args.configs:
        path = REPO / "jobs" / "configs" / f"{name}.yaml"
        base, section = load_experiment(str(path))
        plan = plan_sweep(base, section, source=str(path))
        trained = [t for t in plan.trials if t.tuned]
        measured = sum(trial_seconds(t.run) for t in trained) / 3600
        assumed = sum(
            assumed_hours(t.run, STEP_TIME, args.overhead) * plan.trial_resources(t.run)["GPU"]
            for t in trained
        )
        n_ens = len(plan.trials) - len(trained)
        rows.append((name, TABLE_OF.get(name, "-"), len(trained), n_ens, measured, assumed))
        for i, v in enumerate((len(trained), n_ens, measured, assumed)):
            totals[i] += v

    gpus = ", ".join(f"{m} on an {g}" for m, g in TABLE6_GPU.items())
    print(f"GPU-hours per table: trained trials x the paper's Table 6 time (1 GPU: {gpus})")
    print(
        f"and, for comparison, 4-GPU ZeRO-3 trials at an assumed {STEP_TIME['13b']} s/step (13B), "
        f"{STEP_TIME['7b']} s/step (7B) + {args.overhead:.0%} (benchmarks/sweep_scheduling.py)\n"
    )
    print(
        "| config | table | trained trials | ENS (no training) | GPU-hours, paper's measured "
        "times (1 GPU) | GPU-hours, assumed step time (4 GPUs) |"
    )
    print("|---|---|---|---|---|---|")
    for name, table, n, n_ens, measured, assumed in rows:
        print(f"| `{name}.yaml` | {table} | {n} | {n_ens} | {measured:.0f} | {assumed:.0f} |")
    n, n_ens, measured, assumed = totals
    print(f"| all | | {n} | {n_ens} | {measured:.0f} | {assumed:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
