"""ENS as tracked runs: LoRA members are ordinary training runs; the ensemble is a run of its own.

    result = fit_ensemble(run)      # run.adapter.method == "ens", run.seed == s
    # members: the LoRA runs of seeds melora.baselines.ensemble_seeds(s) = 3(s-1)+1 .. 3s with the
    # run's other settings; a FINISHED one already tracked is reused, a missing one is trained
    result = evaluate_ensemble_run(run, member_run_ids)   # the ensemble's evaluation alone

The ENS run has the tags of every run (method=ens, task, seed = the ENS seed, [sweep], MLflow's
`mlflow.source.*`) plus `ensemble_members` (the member run ids, comma-separated); the params of its
config plus `ensemble.member_run_ids`, `ensemble.member_seeds` and `ensemble.size`; the same metric
keys as every run (`test/<task>/<metric>_n<N>`, `ood/<task>/<metric>_n<N>`), where every N
equals N = 0 because LoRA members are deterministic; reliability diagrams, `config/resolved.yaml`
and `ensemble/members.json`. The probabilities of the members are averaged (`melora.baselines`),
with one base model in memory and each member's adapter loaded in turn.

Std over seeds: ENS seeds 1, 2, 3 use disjoint member sets (LoRA seeds 1-3, 4-6, 7-9), so their
spread is that of independent ensembles. A sweep with ENS seed 1 only reuses the LoRA rows'
seeds 1-3 at no extra training and has no ENS std.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from melora.adapters import attach, read_adapter_config
from melora.baselines.ensemble import DEFAULT_SIZE, ensemble_seeds
from melora.baselines.ensemble import evaluate_ensemble as evaluate_members
from melora.config import AdapterConfig
from melora.errors import ConfigError
from melora.tasks import load_task, make_loader
from orchestrator import tracking
from orchestrator.config import RunConfig
from orchestrator.errors import PosthocError
from orchestrator.posthoc.runs import (
    download_adapter,
    finished_run_config,
    log_evaluation,
    whole_model,
)
from orchestrator.tracking.conventions import MEMBERS_TAG, METHOD_TAG, SEED_TAG, SWEEP_TAG, TASK_TAG
from orchestrator.train.trainer import RunResult, fit_run, run_tags

# Params that may differ between a member and the ENS run's LoRA config: naming, tracking,
# what the final evaluation computes, LAP's section (unused by LoRA), the restart budget.
_FREE_PARAMS = ("name", "seed", "adapter.method", "tracking.", "laplace.", "eval.n_samples",
                "eval.batch_size", "scaling.max_failures")  # fmt: skip


def _matches(member: RunConfig, params: dict[str, str]) -> bool:
    for key, value in member.flat_params().items():
        if key.startswith(_FREE_PARAMS):
            continue
        if params.get(key) != str(value):
            return False
    return True


def find_member_runs(
    uri: str, run: RunConfig, seeds: Sequence[int], sweep: str | None = None
) -> dict[int, str]:
    """{seed: run id} of FINISHED LoRA runs in the run's experiment that can serve as members:
    same task, tag seed, and params equal to `run.ensemble_member(seed)` outside `_FREE_PARAMS`.
    Of several, a run of `sweep` is preferred, then the newest."""
    experiment_id = tracking.ensure_experiment(uri, run.tracking.experiment)
    records = tracking.search_runs(
        uri,
        [experiment_id],
        f"tags.{METHOD_TAG} = 'lora' and tags.{TASK_TAG} = '{run.task.name}' "
        "and attributes.status = 'FINISHED'",
    )
    found: dict[int, str] = {}
    for seed in seeds:
        member = run.ensemble_member(seed)
        usable = [
            r for r in records if r.tags.get(SEED_TAG) == str(seed) and _matches(member, r.params)
        ]
        if usable:
            usable.sort(key=lambda r: sweep is not None and r.tags.get(SWEEP_TAG) == sweep)
            found[seed] = usable[-1].run_id  # oldest first, so the last is the newest preferred
    return found


def fit_ensemble(
    run: RunConfig,
    parent_run_id: str | None = None,
    sweep: str | None = None,
    *,
    size: int = DEFAULT_SIZE,
    train_missing: bool = True,
    tags: Mapping[str, str] | None = None,
) -> RunResult:
    """ENS seed `run.seed`: find or train its LoRA members (`fit_run`), then evaluate them.

    A FINISHED ENS run of the same name with the same members is returned as it is (a resumed
    sweep does not evaluate twice). `tags` are extra MLflow tags (e.g. a sweep's `sweep.method`).
    """
    if run.adapter.method != "ens":
        raise ConfigError(f"fit_ensemble needs adapter.method 'ens', got {run.adapter.method!r}")
    seeds = ensemble_seeds(run.seed, size)
    uri = tracking.resolve_tracking_uri(run.tracking)
    tracking.check_reachable(uri)
    found = find_member_runs(uri, run, seeds, sweep)
    done = _finished_ensemble(uri, run, [found.get(s) for s in seeds])
    if done is not None:
        return RunResult(mlflow_run_id=done.run_id, tracking_uri=uri, metrics=done.metrics, path="")
    missing = [s for s in seeds if s not in found]
    if missing and not train_missing:
        raise PosthocError(
            f"ENS seed {run.seed} needs LoRA runs of seeds {list(seeds)}; none tracked for {missing}"
        )
    if missing:
        for seed in missing:
            found[seed] = fit_run(run.ensemble_member(seed), parent_run_id, sweep).mlflow_run_id
    return evaluate_ensemble_run(run, [found[s] for s in seeds], parent_run_id, sweep, tags)


def _finished_ensemble(uri: str, run: RunConfig, member_ids: list[str | None]):
    """The newest FINISHED ENS run named like `run` whose members are `member_ids`, or None."""
    if None in member_ids:
        return None
    experiment_id = tracking.ensure_experiment(uri, run.tracking.experiment)
    records = tracking.search_runs(
        uri,
        [experiment_id],
        f"tags.{METHOD_TAG} = 'ens' and attributes.status = 'FINISHED' "
        f"and attributes.run_name = '{run.run_name}'",
    )
    same = [r for r in records if r.tags.get(MEMBERS_TAG) == ",".join(member_ids)]
    return same[-1] if same else None


def evaluate_ensemble_run(
    run: RunConfig,
    member_run_ids: Sequence[str],
    parent_run_id: str | None = None,
    sweep: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunResult:
    """Evaluate the ensemble of finished LoRA runs `member_run_ids` as a new MLflow run (module
    doc). With Ray running and `scaling.use_gpu`, the evaluation runs as a Ray task on a GPU."""
    if run.adapter.method != "ens":
        raise ConfigError(f"an ensemble run needs adapter.method 'ens', got {run.adapter.method!r}")
    if not member_run_ids or len(set(member_run_ids)) != len(member_run_ids):
        raise PosthocError(f"an ensemble needs distinct member runs, got {list(member_run_ids)}")
    if run.scaling.use_gpu:
        import ray  # heavy: only on this path, where a running Ray may place the task

        if ray.is_initialized():
            task = ray.remote(_evaluate_ensemble_run).options(
                num_cpus=run.scaling.cpus_per_worker, num_gpus=run.scaling.gpus_per_worker or 1
            )
            return ray.get(task.remote(run, list(member_run_ids), parent_run_id, sweep, tags))
    return _evaluate_ensemble_run(run, list(member_run_ids), parent_run_id, sweep, tags)


def _evaluate_ensemble_run(
    run: RunConfig,
    member_run_ids: list[str],
    parent_run_id: str | None,
    sweep: str | None,
    tags: Mapping[str, str] | None,
) -> RunResult:
    uri = tracking.resolve_tracking_uri(run.tracking)
    with tempfile.TemporaryDirectory() as tmp:
        members, adapter_cfg = _download_members(uri, run, member_run_ids, Path(tmp))
        ids = ",".join(member_run_ids)
        seeds = [seed for _, seed, _ in members]
        extra_params = {
            "ensemble.member_run_ids": ids,
            "ensemble.member_seeds": json.dumps(seeds),
            "ensemble.size": len(members),
        }
        with tracking.tracked_run(
            run.tracking,
            run_name=run.run_name,
            tags={**run_tags(run, sweep), **(tags or {}), MEMBERS_TAG: ids},
            params={**run.flat_params(), **extra_params},
            config_yaml=run.to_yaml(),
            parent_run_id=parent_run_id,
        ) as (uri, ens_id):
            tokenizer, model, _ = whole_model(run)
            attach(model, adapter_cfg)
            test, ood = _loaders(run, tokenizer)
            evaluation = evaluate_members(
                model,
                [folder for _, _, folder in members],
                test,
                ood,
                id_task=run.task.name,
                n_samples=run.eval.n_samples,
                n_bins=run.eval.ece_bins,
            )
            table = [{"run_id": r, "seed": s} for r, s, _ in members]
            log_evaluation(
                uri,
                ens_id,
                run,
                evaluation.metrics,
                evaluation.predictions,
                files={"ensemble/members.json": json.dumps(table, indent=2) + "\n"},
            )
    return RunResult(mlflow_run_id=ens_id, tracking_uri=uri, metrics=evaluation.metrics, path="")


def _download_members(
    uri: str, run: RunConfig, member_run_ids: list[str], folder: Path
) -> tuple[list[tuple[str, int, Path]], AdapterConfig]:
    """Each member's (run id, seed, adapter folder) under `folder`, and their one adapter config;
    PosthocError when a member trained another model or task, or another adapter config."""
    members = []
    for i, run_id in enumerate(member_run_ids):
        cfg = finished_run_config(uri, run_id, folder / f"member{i}")
        if cfg.task.name != run.task.name or cfg.model.name_or_path != run.model.name_or_path:
            raise PosthocError(
                f"member run {run_id} trained {cfg.model.name_or_path} on {cfg.task.name}, but "
                f"the ensemble is of {run.model.name_or_path} on {run.task.name}"
            )
        members.append((run_id, cfg.seed, download_adapter(uri, run_id, folder / f"member{i}")))
    adapter_cfg = read_adapter_config(members[0][2])
    for run_id, _, adapter in members[1:]:
        if read_adapter_config(adapter) != adapter_cfg:
            raise PosthocError(
                f"member run {run_id} has another adapter config than {member_run_ids[0]}: "
                "an ensemble's members differ only in their seed"
            )
    return members, adapter_cfg


def _loaders(run: RunConfig, tokenizer):
    """The test loader of the run's task and one per OOD task (not shuffled, eval batch size)."""
    t = run.task

    def loader(name: str):
        split = load_task(name, t.split_policy, t.data_dir, t.prompt_style, splits=("test",))
        return make_loader(split["test"], tokenizer, run.eval.batch_size, max_length=t.max_length)

    return {t.name: loader(t.name)}, {name: loader(name) for name in t.ood_tasks}
