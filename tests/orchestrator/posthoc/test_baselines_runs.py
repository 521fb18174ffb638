"""The baselines as runs: config validation, the worker's final evaluation for MCD and LAP, the
ENS run that links its members, and `jobs/evaluate.py` on tracked runs (MLflow in a tmp sqlite;
members trained in process), plus one short Ray run of LAP on two workers compared with the same
step in one process (slow)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow import MlflowClient
from transformers import LlamaForCausalLM

import melora
from melora import metrics
from melora.errors import ConfigError
from melora.evaluation import class_logits, predict
from melora.tasks import demo_model_config, demo_tokenizer, load_task, make_loader
from orchestrator import tracking
from orchestrator.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = demo_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def demo_config(tmp_path: Path, **overrides) -> RunConfig:
    base = {
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.storage_path": str(tmp_path / "ray_results"),
        "tracking.experiment": "tests",
        "eval.n_samples": [0, 10],
        "eval.batch_size": 100,
        "adapter.r": 4,
    }
    return load_config(REPO / "jobs/configs/demo.yaml").with_overrides({**base, **overrides})


def demo_model(config: melora.AdapterConfig) -> torch.nn.Module:
    torch.manual_seed(
        0
    )  # the demo's "pretrained" base, as orchestrator.train.model.build_model makes it
    model = LlamaForCausalLM(demo_model_config(TOKENIZER)).eval()
    return melora.attach(model, config)


def train_in_process(run: RunConfig, steps: int) -> torch.nn.Module:
    """A short in-process LoRA fit from the run's seed (the stand-in of a Ray Train run)."""
    model = demo_model(run.adapter)
    torch.manual_seed(run.seed)
    for _, layer in melora.adapted_layers(model):
        layer.reset_adapter_parameters()
    train = load_task("demo", splits=("train",))["train"]
    loader = make_loader(train, TOKENIZER, 32, shuffle=True, seed=run.seed, max_length=128)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for batch in itertools.islice(itertools.cycle(loader), steps):
        loss = F.cross_entropy(class_logits(model, batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def track_finished_run(run: RunConfig, model, tmp_path: Path) -> str:
    """Log `model`'s adapter as a FINISHED training run of `run`, as fit_run leaves one."""
    from orchestrator.train.trainer import prepare_tracking

    uri, run_id = prepare_tracking(run)
    folder = tmp_path / "adapters" / run_id
    melora.save_adapter(model, folder / "adapter")
    tracking.log_artifacts(uri, run_id, folder / "adapter", "adapter")
    tracking.set_terminated(uri, run_id, "FINISHED")
    return run_id


def evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_refuses_what_the_baselines_cannot_run(tmp_path: Path) -> None:
    demo = REPO / "jobs/configs/demo.yaml"
    with pytest.raises(
        ConfigError, match=r"'lap' with scaling.zero_stage=3.*jobs/evaluate.py --laplace"
    ):
        load_config(demo, ["adapter.method=lap", "scaling.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"gridsearch.*'blob' policy has none"):
        load_config(
            demo,
            ["adapter.method=lap", "laplace.prior_tuning=gridsearch", "task.split_policy=blob"],
        )
    with pytest.raises(ConfigError, match=r"adapter.method='mcd' with adapter.dropout=0.0"):
        load_config(demo, ["adapter.method=mcd"])  # the demo file has dropout 0.0
    cfg = load_config(
        demo, ["adapter.method=lap", "laplace.link_approx=probit", "laplace.grid_size=7"]
    )
    assert (cfg.laplace.link_approx, cfg.laplace.grid_size) == ("probit", 7)
    assert cfg.flat_params()["laplace.link_approx"] == "probit" and cfg.run_name == "lap-demo-seed1"
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(ConfigError, match=r"unknown key 'laplace.link'"):
        load_config(demo, ["laplace.link=mc"])


def worker_data(run: RunConfig, **subsets):
    """The worker's `TaskData` for one process (rank 0 of 1), optionally with smaller sets."""
    from orchestrator.train.data import TaskData

    data = TaskData(run, TOKENIZER, rank=0, world=1)
    for name, n in subsets.items():
        if name == "ood":
            data.ood = {k: v.select(range(n)) for k, v in data.ood.items()}
        else:
            setattr(data, name, getattr(data, name).select(range(n)))
    return data


def test_worker_evaluation_keeps_dropout_on_for_mcd_only(tmp_path: Path) -> None:
    """The same adapter weights with dropout 0.1: MCD's N = 10 rows average dropout masks,
    LoRA's N = 10 rows are its N = 0 rows (dropout is a training regulariser there)."""
    from orchestrator.train.dist_eval import evaluate_final

    results = {}
    for method in ("mcd", "lora"):
        run = demo_config(
            tmp_path, **{"adapter.method": method, "adapter.dropout": 0.1, "task.ood_tasks": []}
        )
        model = demo_model(run.adapter)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for _, p in melora.adapter_parameters(model):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        results[method], _ = evaluate_final(
            SimpleNamespace(module=model), worker_data(run, test=200), run
        )
    mcd, lora = results["mcd"], results["lora"]
    for key in ("acc", "nll", "ece", "brier"):
        assert lora[f"test/demo/{key}_n10"] == lora[f"test/demo/{key}_n0"]
        assert mcd[f"test/demo/{key}_n0"] == lora[f"test/demo/{key}_n0"]  # N = 0: dropout off
    assert abs(mcd["test/demo/nll_n10"] - mcd["test/demo/nll_n0"]) > 1e-4


def test_ts_evaluation_is_the_map_with_the_temperature_fitted_on_validation(tmp_path) -> None:
    """adapter.method 'ts': the worker fits T on the validation split's N = 0 predictive (checked
    against a grid search of the validation NLL) and scales every set with it; the accuracy is
    the MAP's, the validation NLL at T is no worse than at T = 1."""
    from melora.baselines.temperature import apply_temperature
    from orchestrator.train.dist_eval import evaluate_final

    overrides = {"task.name": "demo_small", "task.ood_tasks": ["demo_shift"]}
    runs = {m: demo_config(tmp_path, **{"adapter.method": m, **overrides}) for m in ("lora", "ts")}
    model = train_in_process(runs["lora"], steps=30)  # TS trains exactly as MAP (LoRA layers)
    data = worker_data(runs["ts"], validation=100, test=100, ood=60)
    results = {
        m: evaluate_final(SimpleNamespace(module=model), data, run)[0] for m, run in runs.items()
    }
    ts, lora = results["ts"], results["lora"]
    temperature = ts.pop("temperature")
    assert set(ts) == set(lora)
    val_probs, val_labels = predict(model, make_loader(data.validation, TOKENIZER, 50), 0)
    grid = [0.1 * 1.02**k for k in range(200)]  # T from 0.1 to 5.1
    val_nll = [metrics.nll(apply_temperature(val_probs, t), val_labels) for t in grid]
    assert temperature == pytest.approx(grid[val_nll.index(min(val_nll))], rel=0.02)
    assert metrics.nll(apply_temperature(val_probs, temperature), val_labels) <= metrics.nll(
        val_probs, val_labels
    )
    for n in (0, 10):
        assert ts[f"test/demo_small/acc_n{n}"] == lora[f"test/demo_small/acc_n{n}"]
        assert ts[f"test/demo_small/nll_n{n}"] != lora[f"test/demo_small/nll_n{n}"]
        assert ts[f"ood/demo_shift/acc_n{n}"] == lora[f"ood/demo_shift/acc_n{n}"]


def test_ts_needs_a_validation_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"adapter.method='ts' with task.split_policy='blob'"):
        demo_config(tmp_path, **{"adapter.method": "ts", "task.split_policy": "blob"})


def test_lap_step_gives_every_key_of_a_run_and_the_map_at_n0(tmp_path: Path) -> None:
    from orchestrator.train.laplace import evaluate_final_laplace

    run = demo_config(
        tmp_path,
        **{
            "adapter.method": "lap",
            "laplace.prior_tuning": "gridsearch",
            "laplace.grid_size": 3,
            "laplace.fit_batch_size": 16,
        },
    )
    model = train_in_process(run, steps=30)
    data = worker_data(run, train=300, validation=20, test=40, ood=30)
    final, predictions = evaluate_final_laplace(model, data, run)

    keys = {f"test/demo/{m}_n{n}" for m in ("acc", "nll", "ece", "brier") for n in (0, 10)}
    keys |= {
        f"ood/demo_ood/{m}_n{n}" for m in ("acc", "nll", "ece", "brier", "auroc") for n in (0, 10)
    }
    keys |= {
        f"{s}/{m}_n{n}"
        for s in ("test/demo", "ood/demo_ood")
        for m in ("aurc", "acc_cov80")
        for n in (0, 10)
    }
    lap_keys = {
        "lap/prior_precision",
        "lap/log_marglik",
        "lap/fit_seconds",
        "lap/tune_seconds",
        "lap/predict_seconds",
        "lap/kfac_bytes",
        "lap/kfac_eig_bytes",
    }
    assert set(final) == keys | lap_keys
    assert sorted(predictions) == [
        "ood/demo_ood/n0",
        "ood/demo_ood/n10",
        "test/demo/n0",
        "test/demo/n10",
    ]
    assert final["lap/prior_precision"] in {10.0**-4, 1.0, 10.0**4}  # a grid value
    assert all(math.isfinite(v) for v in final.values())
    loader = make_loader(data.test, TOKENIZER, 16, max_length=run.task.max_length)
    map_probs, labels = predict(model, loader, 0)  # N = 0 is the MAP
    for key, value in metrics.compute_all(map_probs, labels).items():
        assert final[f"test/demo/{key}_n0"] == pytest.approx(value, rel=1e-4, abs=1e-6)
    assert all(type(layer).__name__ == "LoraLinear" for _, layer in melora.adapted_layers(model))


@pytest.fixture(scope="module")
def tracked_members(tmp_path_factory):
    """Three finished LoRA runs (seeds 1, 2, 3) and two that must not be taken as members."""
    tmp_path = tmp_path_factory.mktemp("ens")
    base = demo_config(tmp_path, **{"adapter.method": "lora", "adapter.dropout": 0.1})
    ids, models = {}, {}
    for seed in (1, 2, 3):
        run = base.with_overrides({"seed": seed})
        models[seed] = train_in_process(run, steps=8)
        ids[seed] = track_finished_run(run, models[seed], tmp_path)
    decoy = base.with_overrides({"name": "other-lr", "optim.lr": 0.01})  # another config
    track_finished_run(decoy, models[1], tmp_path)
    from orchestrator.train.trainer import prepare_tracking

    prepare_tracking(base.with_overrides({"name": "unfinished", "seed": 2}))  # RUNNING
    return SimpleNamespace(tmp_path=tmp_path, base=base, ids=ids, models=models)


def test_ensemble_run_links_its_members_and_averages_their_probabilities(tracked_members) -> None:
    from orchestrator.errors import PosthocError
    from orchestrator.posthoc.ensemble import MEMBERS_TAG, fit_ensemble

    t = tracked_members
    ens = t.base.with_overrides({"adapter.method": "ens", "seed": 1})
    result = fit_ensemble(ens, train_missing=False)

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    member_ids = [t.ids[s] for s in (1, 2, 3)]
    assert run.info.status == "FINISHED" and run.info.run_name == "ens-demo-seed1"
    assert run.data.tags["method"] == "ens" and run.data.tags["seed"] == "1"
    assert run.data.tags[MEMBERS_TAG] == ",".join(member_ids)
    assert run.data.params["ensemble.member_run_ids"] == ",".join(member_ids)
    assert json.loads(run.data.params["ensemble.member_seeds"]) == [1, 2, 3]
    # the same metric keys as a training run at the same N; every N is the members' mean prediction
    keys = {f"test/demo/{m}_n{n}" for m in ("acc", "nll", "ece", "brier") for n in (0, 10)}
    keys |= {
        f"ood/demo_ood/{m}_n{n}" for m in ("acc", "nll", "ece", "brier", "auroc") for n in (0, 10)
    }
    # the members are the ensemble's draws: selective prediction and MI at every N
    keys |= {f"test/demo/{m}_n{n}" for m in ("aurc", "acc_cov80", "mi") for n in (0, 10)}
    keys |= {
        f"ood/demo_ood/{m}_n{n}" for m in ("aurc", "acc_cov80", "mi", "auroc_mi") for n in (0, 10)
    }
    assert set(run.data.metrics) == keys

    def loader(task: str):
        return make_loader(
            load_task(task, splits=("test",))["test"], TOKENIZER, 100, max_length=128
        )

    test = [predict(t.models[s], loader("demo"), 0) for s in (1, 2, 3)]
    ood = [predict(t.models[s], loader("demo_ood"), 0)[0] for s in (1, 2, 3)]
    mean = torch.stack([p for p, _ in test]).double().mean(0).float()
    for key, value in metrics.compute_all(mean, test[0][1]).items():
        assert run.data.metrics[f"test/demo/{key}_n0"] == pytest.approx(value, rel=1e-5, abs=1e-7)
        assert run.data.metrics[f"test/demo/{key}_n10"] == run.data.metrics[f"test/demo/{key}_n0"]
    auroc = metrics.ood_auroc(mean, torch.stack(ood).double().mean(0).float())
    assert run.data.metrics["ood/demo_ood/auroc_n0"] == pytest.approx(auroc, rel=1e-6)

    def entropy(p: torch.Tensor) -> torch.Tensor:  # nats, 0 log 0 = 0
        p = p.double()
        return -(p * p.clamp_min(1e-300).log()).sum(1)

    # MI written out: H(mean of the members) - mean of the members' entropies, averaged over rows
    mi = entropy(mean) - torch.stack([entropy(p) for p, _ in test]).mean(0)
    assert run.data.metrics["test/demo/mi_n0"] == pytest.approx(mi.mean().item(), rel=1e-4)
    assert run.data.metrics["test/demo/mi_n0"] > 0  # three seeds disagree somewhere
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"reliability", "config", "ensemble"} <= artifacts
    members = tracking.download_artifact(
        result.tracking_uri, result.mlflow_run_id, "ensemble/members.json", t.tmp_path / "dl"
    )
    assert [m["run_id"] for m in json.loads(members.read_text())] == member_ids

    # asked again (a resumed sweep), the finished ENS run of the same members is returned
    assert fit_ensemble(ens, train_missing=False).mlflow_run_id == result.mlflow_run_id
    # ENS seed 2 needs LoRA seeds 4-6: none is tracked, and training them was not allowed
    with pytest.raises(PosthocError, match=r"seeds \[4, 5, 6\]; none tracked for \[4, 5, 6\]"):
        fit_ensemble(ens.with_overrides({"seed": 2}), train_missing=False)

    # the command line: the same ensemble from explicit member ids
    code = evaluate_script().main(
        ["--ensemble", *member_ids, "--tracking-uri", result.tracking_uri]
    )
    assert code == 0
    (cli,) = [
        r
        for r in client.search_runs([run.info.experiment_id], "tags.method = 'ens'")
        if r.info.run_id != run.info.run_id
    ]
    assert cli.data.tags[MEMBERS_TAG] == ",".join(member_ids)
    assert cli.data.metrics["test/demo/nll_n0"] == pytest.approx(
        run.data.metrics["test/demo/nll_n0"], rel=1e-6
    )


def test_laplace_on_a_finished_map_run_from_the_command_line(tracked_members) -> None:
    t = tracked_members
    uri = f"sqlite:///{t.tmp_path}/mlflow.db"
    map_id = t.ids[1]
    code = evaluate_script().main(
        [
            "--laplace",
            map_id,
            "--tracking-uri",
            uri,
            "--set",
            "task.ood_tasks=[]",
            "--set",
            "laplace.fit_batch_size=32",
        ]
    )
    assert code == 0
    client = MlflowClient(uri)
    (lap,) = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], "tags.method = 'lap'"
    )
    assert lap.info.status == "FINISHED" and lap.data.tags["map_run"] == map_id
    assert (
        lap.data.params["laplace.map_run_id"] == map_id
        and lap.data.params["adapter.method"] == "lap"
    )
    assert lap.data.metrics["lap/prior_precision"] > 0 and "test/demo/ece_n10" in lap.data.metrics
    test = make_loader(load_task("demo", splits=("test",))["test"], TOKENIZER, 100, max_length=128)
    map_probs, labels = predict(t.models[1], test, 0)
    assert lap.data.metrics["test/demo/nll_n0"] == pytest.approx(
        metrics.nll(map_probs, labels), rel=1e-4
    )
    # a run that is not a LoRA (MAP) run is refused, naming why
    melora_run = t.base.with_overrides({"name": "a-melora-run", "adapter.method": "melora"})
    bad_id = track_finished_run(melora_run, demo_model(melora_run.adapter), t.tmp_path)
    assert evaluate_script().main(["--laplace", bad_id, "--tracking-uri", uri]) == 1


@pytest.mark.slow
def test_lap_trial_on_two_ray_workers_equals_one_process(tmp_path: Path) -> None:
    """One short Ray Train run of method lap (ZeRO-2, 2 workers): the Laplace step after MAP
    training shards its prior-precision gridsearch and its predictions over both ranks and logs
    like every run. The same step in this one process, around the run's logged adapter, must give
    the same prior precision, evidence and metrics (rel 1e-5): a wrong shard, a row lost,
    doubled or paired with another row's label would not, nor a gridsearch NLL left unsummed over
    ranks (here rank 0's half of the validation set alone prefers 10^-3, the whole set 10^-4).
    link_approx 'probit' makes N >= 1 deterministic (MC draws come from a stream per rank), and a
    9-value grid (10^-4 .. 10^4) lets the summed validation NLL decide between neighbours.
    demo_small (32 training rows) and no OOD set keep the fit and the one-process step short:
    the OOD sets go through the same sharded prediction as the test set."""
    import ray

    from orchestrator.train.data import TaskData
    from orchestrator.train.laplace import evaluate_final_laplace
    from orchestrator.train.trainer import fit_run, init_ray

    run = demo_config(
        tmp_path,
        **{
            "adapter.method": "lap",
            "optim.max_steps": 12,
            "eval.eval_every": 12,
            "eval.n_samples": [0, 3],
            "task.name": "demo_small",
            "task.ood_tasks": [],
            "laplace.prior_tuning": "gridsearch",
            "laplace.grid_size": 9,
            "laplace.link_approx": "probit",
            "laplace.fit_batch_size": 32,
        },
    )
    init_ray(num_cpus=2)
    try:
        result = fit_run(run)
    finally:
        ray.shutdown()
    client = MlflowClient(result.tracking_uri)
    tracked = client.get_run(result.mlflow_run_id)
    assert tracked.info.status == "FINISHED" and tracked.data.tags["method"] == "lap"
    two = tracked.data.metrics
    grid = [10.0**k for k in range(-4, 5)]  # float32 in the step: 1e-4 is 9.99999975e-05
    assert any(math.isclose(two["lap/prior_precision"], v, rel_tol=1e-6) for v in grid)
    assert {"adapter", "peft_lora", "reliability", "config"} <= {
        a.path for a in client.list_artifacts(result.mlflow_run_id)
    }
    # one process around the logged adapter: the whole of every set on rank 0 of 1
    adapter = Path(client.download_artifacts(result.mlflow_run_id, "adapter", str(tmp_path / "dl")))
    model = demo_model(melora.read_adapter_config(adapter))
    melora.load_adapter(model, adapter)
    one, predictions = evaluate_final_laplace(model, TaskData(run, TOKENIZER, rank=0, world=1), run)
    assert [len(predictions[f"test/demo_small/n{n}"][1]) for n in (0, 3)] == [500, 500]
    assert one["lap/prior_precision"] == two["lap/prior_precision"]
    kinds = ("acc", "nll", "ece", "brier", "aurc", "acc_cov80")
    compared = {f"test/demo_small/{m}_n{n}" for m in kinds for n in (0, 3)}
    compared |= {"lap/prior_precision", "lap/log_marglik", "lap/kfac_bytes", "lap/kfac_eig_bytes"}
    assert compared <= set(one) and compared <= set(two)
    for key in sorted(compared):  # observed: equal to the last bit
        assert math.isfinite(two[key]), key
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    # N = 0 is the MAP: the one-process predictions are the adapter's own
    test = load_task("demo_small", splits=("test",))["test"]
    probs, labels = predict(model, make_loader(test, TOKENIZER, 100, max_length=128), 0)
    assert torch.equal(predictions["test/demo_small/n0"][1], labels)
    assert two["test/demo_small/nll_n0"] == pytest.approx(metrics.nll(probs, labels), rel=1e-4)
