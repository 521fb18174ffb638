"""Every shipped experiment YAML plans (the --dry-run path), and the sweep schema's checks.

Nothing here starts Ray or writes MLflow: `plan_sweep` builds and validates every trial's config.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from melora.errors import ConfigError
from orchestrator.config import RunConfig, load_experiment
from orchestrator.errors import SweepError
from orchestrator.sweep.grid import draw_space
from orchestrator.sweep.outcome import SweepOutcome, TrialOutcome, results_table
from orchestrator.sweep.plan import SweepPlan, plan_sweep
from orchestrator.sweep.tune import run_sweep
from orchestrator.tracking.conventions import ENS_MEMBER, ENSEMBLE

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
SWEEP = [sys.executable, str(REPO / "jobs" / "sweep.py")]
EXPECTED_TRIALS = {  # name -> trials; a new YAML must be added here
    # LoRA 2 + MCD 2 + BLoB 2 + Me-LoRA {noise on, off} x 2 sigma_p x 2 seeds + ENS 1 + its member seed 3
    "demo": 16,
    "demo_lap": 2,  # LAP x 2 seeds
    "sigma_rank_sweep": 20,  # 5 sigma_p x 4 ranks
    "table2_id_13b": 144,  # 6 methods x 6 tasks x 3 seeds + ENS members seeds 4-9 x 6 tasks
    "table8_id_7b": 144,
    "table3_ood_13b": 24,  # 6 methods x 3 seeds + ENS members seeds 4-9
    "table9_ood_7b": 24,
    "ablation_noise_13b": 36,  # noise on/off x 6 tasks x 3 seeds
    "llama2_13b": 1,  # a single run (no sweep section): one trial
    "stories260k": 1,  # the 13B path in miniature: one run
    "demo_study": 33,  # 9 rows x 3 seeds + 6 ENS-only members (ENS seeds 2, 3)
}
PAPER = [c for c in CONFIGS if c.stem.startswith(("table", "ablation"))]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths (mlflow.db, ray_results) resolve inside tmp_path, never in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def plan(path: Path, *overrides: str, name: str | None = None) -> SweepPlan:
    base, section = load_experiment(path, overrides)
    return plan_sweep(base, section, name=name, source=str(path))


def demo_base(**sweep) -> tuple[RunConfig, dict]:
    base, _ = load_experiment(REPO / "jobs/configs/demo.yaml")
    return base, sweep


@pytest.mark.parametrize("path", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_yaml_dry_runs(
    path: Path, tmp_path: Path, capsys, sweep_job, request
) -> None:
    assert path.stem in EXPECTED_TRIALS, (
        f"add {path.name}'s expected trial count to EXPECTED_TRIALS"
    )
    overrides = []
    if path.stem == "stories260k":  # its ../shared paths are relative to the repo, not tmp_path
        overrides = [
            "--set", f"model.name_or_path={request.getfixturevalue('stories_dir')}",
            "--set", f"task.data_dir={request.getfixturevalue('data_dir')}",
        ]  # fmt: skip
    assert sweep_job.main(["--config", str(path), "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    n = EXPECTED_TRIALS[path.stem]
    assert f": {n} trials (" in out
    listed = [line for line in out.splitlines() if line[:6].strip().isdigit()]
    assert len(listed) == n and len({line.split()[1] for line in listed}) == n
    assert "each trial asks for:" in out
    assert not any(tmp_path.iterdir()), "a dry run must not write anything"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must start with a comment giving its command"
    assert f"jobs/configs/{path.name}" in path.read_text() or path.stem == "demo"


@pytest.mark.parametrize("path", PAPER, ids=[c.stem for c in PAPER])
def test_paper_yamls_use_table7_on_four_gpus_with_zero3(path: Path) -> None:
    p = plan(path)
    head = [line for line in path.read_text().splitlines()[:6] if line.startswith("#")]
    command = (
        f"ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/{path.name}"
    )
    assert any(line.endswith(command) for line in head), (
        f"{path.name}: its first lines give {command!r}"
    )
    size = "13b" if "13b" in path.stem else "7b"
    for t in p.trials:
        run = t.run
        assert run.model.name_or_path == f"meta-llama/Llama-2-{size}-hf"
        stage = 2 if run.adapter.method == "lap" else 3  # LAP's Laplace step needs whole weights
        assert (run.scaling.num_workers, run.scaling.use_gpu, run.scaling.zero_stage) == (
            4,
            True,
            stage,
        )
        assert run.optim.batch_size * run.optim.grad_accum * run.scaling.num_workers == 4
        assert (run.adapter.r, run.adapter.alpha, run.adapter.dropout) == (8, 16.0, 0.1)
        assert (run.optim.lr, run.optim.kl_lr, run.optim.max_steps) == (1e-4, 1e-4, 5000)
        assert (run.eval.eval_every, run.task.max_length, run.optim.warmup_ratio) == (
            100,
            300,
            0.02,
        )
        assert run.optim.kl_optimizer == "sgd" and run.task.data_dir is None
        assert run.model.resolved_dtype(on_gpu=True) == "bfloat16"
        if run.adapter.is_bayesian:
            assert run.adapter.sigma_p == 0.2
        if run.adapter.method in ("lora", "mcd", "ens", "lap"):
            assert run.optim.weight_decay == 1e-5  # MAP, and the baselines built on it
        assert run.seed in (1, 2, 3) or t.role == ENS_MEMBER
    if "ood" in path.stem:
        assert {t.run.task.name for t in p.trials} == {"openbookqa"}
        assert set(p.trials[0].run.task.ood_tasks) == {
            "arc_challenge",
            "arc_easy",
            "mmlu_college_chemistry",
            "mmlu_college_physics",
            "mmlu_college_mathematics",
        }
    else:
        assert len({t.run.task.name for t in p.trials}) == 6
    if "ablation" not in path.stem:  # the six rows of Tables 2, 3, 8, 9; ENS from 9 MAP runs
        rows = {t.tags["sweep.method"] for t in p.trials if t.role != ENS_MEMBER}
        assert rows == {"map", "mcd", "ens", "lap", "blob", "melora"}
        by_name = {t.name: t for t in p.trials}
        for ens in (t for t in p.trials if t.role == ENSEMBLE):
            members = [by_name[m].run for m in ens.members]
            assert [m.seed for m in members] == [3 * ens.run.seed - 2 + i for i in range(3)]
            assert all(m.adapter.method == "lora" and m.task == ens.run.task for m in members)
    if "ablation" in path.stem:
        assert {t.run.adapter.method for t in p.trials} == {"melora"}
        assert {t.tags["sweep.noise"] for t in p.trials} == {"ours", "wo-noise"}
        obqa = [t for t in p.trials if t.run.task.name == "openbookqa"]
        assert len(obqa) == 6 and all(len(t.run.task.ood_tasks) == 5 for t in obqa)
    # GPU trials: 4 GPUs each, so 16 GPUs hold 4 at once
    assert p.max_concurrent({"CPU": 208, "GPU": 16}) == 4


def test_demo_sweep_trials_names_and_rows() -> None:
    p = plan(REPO / "jobs/configs/demo.yaml")
    names = [t.name for t in p.trials]
    assert names[0] == "demo-lora-seed1" and "demo-melora-nonoise-sigma_p0.1-seed2" in names
    melora = [t for t in p.trials if t.run.adapter.method == "melora"]
    assert {(t.run.adapter.prior_noise, t.run.adapter.sigma_p) for t in melora} == {
        (True, 0.1),
        (True, 0.2),
        (False, 0.1),
        (False, 0.2),
    }
    assert {t.row for t in p.trials if t.role != ENS_MEMBER} == {
        "lora",
        "mcd",
        "ens",
        "blob",
        "melora-sigma_p0.1",
        "melora-sigma_p0.2",
        "melora-nonoise-sigma_p0.1",
        "melora-nonoise-sigma_p0.2",
    }
    for t in p.trials:  # the base values stay what jobs/train.py runs; the sweep shortens them
        assert t.run.optim.max_steps == 60 and t.run.name == t.name
        assert t.run.tracking.tags["sweep.method"] in (
            "lora", "mcd", "ens", "blob", "melora", "melora-nonoise"
        )  # fmt: skip
        assert t.run.tracking.storage_path == str(p.sweep_dir / "runs")
    base, _ = load_experiment(REPO / "jobs/configs/demo.yaml")
    assert base.optim.max_steps > 60 and base.scaling.cpus_per_worker == 0.5
    # two trials at once on 2 cores: driver 0.5 + 2 workers x 0.25
    assert p.max_concurrent({"CPU": 2.0}) == 2
    assert p.max_concurrent({"CPU": 1.5}) == 1


def test_the_demo_study_runs_every_method_in_the_overfitting_regime() -> None:
    """Rows as the report names them, 3 seeds each, on the small training set and the
    label-preserving shift; only the method's own fields differ between rows."""
    from melora.tasks import load_task
    from orchestrator.report.rows import method_row

    p = plan(REPO / "jobs/configs/demo_study.yaml")
    rows = {}
    for t in p.trials:
        if t.role == ENS_MEMBER:
            continue
        a = t.run.adapter
        label = method_row(a.method, {k: str(v) for k, v in t.run.flat_params().items()})
        if a.method == "melora" and a.kl_variance == "exact":
            label += " (exact KL)"
        rows.setdefault(label, set()).add(t.run.seed)
    assert rows == {
        label: {1, 2, 3}
        for label in (
            "MAP", "MAP+TS", "MCD", "ENS", "LAP", "BLoB", "Me-LoRA", "Me-LoRA w/o noise",
            "Me-LoRA (exact KL)",
        )
    }  # fmt: skip
    for t in p.trials:
        assert (t.run.task.name, t.run.task.ood_tasks) == ("demo_small", ("demo_shift",))
        assert t.run.eval.n_samples == (0, 1, 10)
        if t.run.adapter.method == "blob":
            assert not t.run.adapter.flipout and t.run.adapter.prior_noise
    train = load_task("demo_small", "paper", splits=("train",))["train"]
    assert len(train) == 32  # small: MAP overfits it (docs/demo_study.md)


def test_concurrency_counts_whole_trials_and_refuses_a_cluster_too_small() -> None:
    p = plan(REPO / "jobs/configs/table2_id_13b.yaml")
    assert p.trial_resources(p.trials[0].run) == {"CPU": 33.0, "GPU": 4.0}
    assert p.max_concurrent({"CPU": 1000, "GPU": 8}) == 2  # GPUs bound it
    assert p.max_concurrent({"CPU": 40, "GPU": 64}) == 1  # CPUs bound it
    with pytest.raises(SweepError, match=r"needs \{CPU: 33, GPU: 4\}.*has \{CPU: 16, GPU: 0\}"):
        p.max_concurrent({"CPU": 16})
    fixed = plan(REPO / "jobs/configs/table2_id_13b.yaml", "sweep.max_concurrent_trials=3")
    assert fixed.max_concurrent({"CPU": 16}) == 3  # an autoscaler adds the nodes: trusted


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"grdi": {}}, r"unknown key 'sweep.grdi' \(did you mean 'grid'\?\)"),
        (
            {"grid": {"adapter.sigmap": [0.1]}},
            r"sweep.grid.adapter.sigmap: unknown field 'adapter.sigmap' \(did you mean 'sigma_p'\?\)",
        ),
        ({"grid": {"seed": 1}}, r"sweep.grid.seed=1 must be a non-empty list"),
        ({"grid": {"seed": [1, 1]}}, r"sweep.grid.seed lists 1 twice"),
        (
            {"grid": {"task.ood_tasks": ["demo_ood"]}},
            r"holds a list, so its choices are a list of lists",
        ),
        ({"grid": {"tracking.experiment": ["a", "b"]}}, r"cannot vary 'tracking.experiment'"),
        (
            {
                "grid": {
                    "method": {"lora": {"adapter.method": "lora"}},
                    "m2": {"x": {"adapter.method": "blob"}},
                }
            },
            r"sweep.grid.m2 and sweep.grid.method both set 'adapter.method'",
        ),
        (
            {"grid": {"task": {"a": {"task.name": "demo"}}}},
            r"'task.a' names a config field.*not 'task'",
        ),
        (
            {"search": "bayes"},
            r"sweep.search='bayes' is not allowed: choose one of \['grid', 'random', 'optuna'\]",
        ),
        ({"search": "random"}, r"sweep.search='random' needs sweep.space"),
        (
            {"search": "random", "space": {"adapter.sigma_p": {"loguniform": [0, 1]}}},
            r"loguniform=\[0, 1\] must be \[lo, hi\] with 0 < lo < hi",
        ),
        (
            {"scheduler": "asha", "metric": "test/demo/acc_n0"},
            r"sweep.metric must be a validation metric",
        ),
        ({"metric": "val/auc"}, r"sweep.metric='val/auc' is not a metric a trial reports"),
        ({"max_concurrent_trials": 0}, r"sweep.max_concurrent_trials=0 must be an integer >= 1"),
        ({"driver_cpus": 0}, r"sweep.driver_cpus=0 must be a number > 0"),
        ({"driver_cpus": "two"}, r"sweep.driver_cpus='two' must be a finite number"),
        ({"num_samples": 0}, r"sweep.num_samples=0 must be an integer >= 1"),
        ({"max_trials": True}, r"sweep.max_trials=True must be an integer"),
        ({"search_seed": 2**31}, r"sweep.search_seed=2147483648 is out of range: allowed is <= "),
        (
            {"scheduler": "asha", "asha": {"reduction_factor": 1}},
            r"sweep.asha.reduction_factor=1 must be an integer >= 2",
        ),
        (
            {"scheduler": "asha", "asha": {"grace_perod": 5}},
            r"unknown key 'sweep.asha.grace_perod' \(did you mean 'grace_period'\?\); allowed keys in sweep.asha",
        ),
        ({"fixed": {"optim.max_steps": 0}}, r"sweep.fixed: optim.max_steps=0 is out of range"),
    ],
)
def test_bad_sweep_sections_fail_naming_the_field(sweep: dict, message: str) -> None:
    base, _ = load_experiment(REPO / "jobs/configs/demo.yaml")
    with pytest.raises(ConfigError, match=message):
        plan_sweep(base, sweep, name="t")


def test_a_bad_grid_value_fails_naming_the_trial_and_the_field() -> None:
    base, _ = load_experiment(REPO / "jobs/configs/demo.yaml")
    sweep = {"grid": {"adapter.sigma_p": [0.1, -1.0], "seed": [1]}}
    with pytest.raises(
        ConfigError,
        match=r"sweep trial t-sigma_p-1-seed1 \(adapter.sigma_p=-1.0, seed=1\): adapter.sigma_p",
    ):
        plan_sweep(base, sweep, name="t")
    blob_split = {"grid": {"task.split_policy": ["paper", "blob"]}}
    with pytest.raises(
        ConfigError, match=r"needs a validation split, but trial t-split_policyblob"
    ):
        plan_sweep(base, blob_split, name="t")


def test_optuna_without_the_package_fails_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    base, _ = load_experiment(REPO / "jobs/configs/demo.yaml")
    space = {"adapter.sigma_p": {"loguniform": [0.05, 1.0]}}
    with pytest.raises(ConfigError, match=r"needs the optuna package.*pip install optuna"):
        plan_sweep(base, {"search": "optuna", "space": space}, name="t")


def test_random_search_is_seeded_and_crossed_with_the_grid() -> None:
    space = {"adapter.sigma_p": {"loguniform": [0.05, 1.0]}, "adapter.r": {"choice": [4, 8]}}
    a, b = draw_space(space, 5, seed=0), draw_space(space, 5, seed=0)
    assert a == b and draw_space(space, 5, seed=1) != a
    assert all(0.05 <= p["adapter.sigma_p"] <= 1.0 and p["adapter.r"] in (4, 8) for p in a)
    assert all(p["adapter.sigma_p"] == float(f"{p['adapter.sigma_p']:.4g}") for p in a)
    p = plan(
        REPO / "jobs/configs/sigma_rank_sweep.yaml",
        "sweep.search=random",
        "sweep.num_samples=3",
        "sweep.grid={seed: [1, 2]}",
        "sweep.space={adapter.sigma_p: {loguniform: [0.05, 1.0]}, adapter.r: {choice: [4, 8, 16, 64]}}",
    )
    assert len(p.trials) == 6 and len({t.name for t in p.trials}) == 6
    draws = draw_space(p.sweep.space, 3, seed=0)
    assert [t.run.adapter.sigma_p for t in p.trials if t.run.seed == 1] == [
        d["adapter.sigma_p"] for d in draws
    ]
    assert len({t.row for t in p.trials}) == 3 and all("seed" not in t.row for t in p.trials)


def test_nested_set_overrides_and_run_name_limits() -> None:
    # `--set sweep.grid.adapter.r=[4,8]` arrives nested; long values are hashed into the name
    p = plan(REPO / "jobs/configs/demo.yaml", "sweep.grid={adapter: {r: [4, 8]}}", name="x" * 60)
    assert [t.values for t in p.trials] == [{"adapter.r": 4}, {"adapter.r": 8}]
    assert all(len(t.name) <= 100 for t in p.trials) and len({t.name for t in p.trials}) == 2
    q = plan(REPO / "jobs/configs/demo.yaml", "sweep.grid={task.ood_tasks: [[], [demo_ood]]}")
    assert [t.run.task.ood_tasks for t in q.trials] == [(), ("demo_ood",)]


def test_resume_refuses_a_changed_sweep_and_a_new_start_refuses_an_existing_one(
    tmp_path: Path,
) -> None:
    p = plan(REPO / "jobs/configs/demo.yaml")
    p.sweep_dir.mkdir(parents=True)
    (p.sweep_dir / "sweep.json").write_text(
        json.dumps({"parent_run_id": "x", "config_hash": "other"})
    )
    with pytest.raises(SweepError, match=r"exists already .*pass --resume"):
        run_sweep(p, resume=False)
    with pytest.raises(SweepError, match=r"started with another config \(hash other"):
        run_sweep(p, resume=True)


def test_results_table_is_mean_and_std_over_seeds() -> None:
    p = plan(
        REPO / "jobs/configs/demo.yaml",
        "sweep.grid={method: {lora: {adapter.method: lora}}, seed: [1, 2, 3]}",
    )
    accs, nlls = [0.5, 0.6, 0.8], [1.0, 0.9, 0.7]
    trials = [
        TrialOutcome(
            t.name,
            t.row,
            "FINISHED" if i < 3 else "FAILED",
            f"id{i}",
            {
                "test/demo/acc_n0": accs[i],
                "test/demo/nll_n0": nlls[i],
                "ood/demo_ood/acc_n0": 0.2,
                "val/nll": nlls[i],
            },
            run=t.run,
        )
        for i, t in enumerate(p.trials)
    ]
    table = results_table(SweepOutcome(p, "parent", trials, trials[2]))
    row = next(line for line in table.splitlines() if line.startswith("lora") and "ood" not in line)
    mean = sum(accs) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / 2)  # sample std over seeds
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in row and " 3/3 " in row
    assert "0.87 ± 0.15" in row  # nll: mean 0.8667, std 0.1528
    ood = next(line for line in table.splitlines() if "demo_ood (ood)" in line)
    assert "20.00 ± 0.00" in ood
    assert table.splitlines()[-1] == f"best trial by val/nll: {trials[2].name} (0.7000)"


def test_dry_run_of_the_default_starts_nothing(tmp_path: Path) -> None:
    """`python jobs/sweep.py --dry-run` (the demo) from a fresh folder: the trial list, no files, no Ray."""
    out = subprocess.run(
        [*SWEEP, "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert (
        "sweep demo: 16 trials" in out.stdout
        and "demo-melora-nonoise-sigma_p0.2-seed2" in out.stdout
    )
    assert "driver {CPU: 0.5} + 2 workers x {CPU: 0.25} = {CPU: 1}" in out.stdout
    assert not any(tmp_path.iterdir())


def test_cli_exit_codes(tmp_path: Path, sweep_job, capsys) -> None:
    """2: a config error, nothing started; 1: an existing sweep without --resume (before Ray or MLflow)."""
    assert sweep_job.main(["--dry-run", "--set", "sweep.grid.method.lora.seed=[0, -1]"]) == 2
    assert "config error: sweep trial demo-lora-seed-1" in capsys.readouterr().err
    state = tmp_path / "ray_results" / "demo" / "sweep.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"parent_run_id": "x", "config_hash": "y"}))
    assert sweep_job.main([]) == 1
    assert "pass --resume to continue it" in capsys.readouterr().err
    # nothing but the sweep's lock file (state_files.exclusive), kept beside its state
    written = sorted(p.name for p in tmp_path.rglob("*"))
    assert written == ["demo", "ray_results", "sweep.json", "sweep.lock"]


def test_ens_trials_reuse_planned_lora_trials_and_plan_the_missing_members() -> None:
    p = plan(REPO / "jobs/configs/demo.yaml")
    by_name = {t.name: t for t in p.trials}
    (ens,) = [t for t in p.trials if t.run.adapter.method == "ens"]
    assert ens.role == ENSEMBLE and not ens.tuned
    assert ens.members == ("demo-lora-seed1", "demo-lora-seed2", "demo-ens-member-seed3")
    member = by_name["demo-ens-member-seed3"]
    assert member.role == ENS_MEMBER and member.tuned and member.row == ""
    assert member.run.tracking.tags["sweep.role"] == "ens_member"
    for name, seed in zip(ens.members, (1, 2, 3), strict=True):
        want = ens.run.ensemble_member(seed).to_dict()  # the member config, field by field
        got = by_name[name].run.to_dict()
        for d in (want, got):
            d.pop("name")
            d["tracking"].pop("tags")
        assert got == want
    # ENS seeds 1 and 2 over a LoRA row of seed 1 only: members 1 (reused), 2-6 planned, in order
    q = plan(
        REPO / "jobs/configs/demo.yaml",
        "sweep.grid={method: {lora: {adapter.method: lora, seed: [1]}, "
        "ens: {adapter.method: ens, seed: [1, 2]}}}",
    )
    ens1, ens2 = [t for t in q.trials if t.role == ENSEMBLE]
    assert ens1.members == ("demo-lora-seed1", "demo-ens-member-seed2", "demo-ens-member-seed3")
    assert ens2.members == tuple(f"demo-ens-member-seed{s}" for s in (4, 5, 6))
    assert sum(t.role == ENS_MEMBER for t in q.trials) == 5 and len(q.trials) == 8
    # the Tune grid holds the trained trials only; the ENS trials are evaluated after them
    from orchestrator.sweep.trial import trainable_data

    assert set(trainable_data(q, "parent")["trials"]) == {t.name for t in q.trials if t.tuned}


def test_an_ens_seed_below_1_fails_naming_the_trial() -> None:
    with pytest.raises(ConfigError, match=r"sweep trial demo-ens-seed0: an ENS seed must be >= 1"):
        plan(REPO / "jobs/configs/demo.yaml", "sweep.grid.method.ens.seed=[0]")


def test_optuna_cannot_draw_ens() -> None:
    base, _ = load_experiment(REPO / "jobs/configs/demo.yaml")
    space = {"adapter.method": {"choice": ["lora", "ens"]}}
    with pytest.raises(ConfigError, match=r"'ens' is evaluated from its members' runs"):
        plan_sweep(base, {"search": "optuna", "space": space}, name="t")
