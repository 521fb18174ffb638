"""The run config: YAML + --set loading, validation messages, round trips, derived values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from melora import AdapterConfig, ConfigError
from orchestrator.config import (
    SECTIONS,
    RunConfig,
    load_config,
    load_experiment,
    parse_overrides,
)

# (id, YAML text of the config file, --set overrides, fragments the message must contain)
BAD_INPUTS = [
    ("string_for_number", "optim:\n  lr: fast\n", [], ["optim.lr='fast'", "number"]),
    ("quoted_number", "optim:\n  lr: '1e-4'\n", [], ["optim.lr='1e-4'", "number"]),
    ("float_for_int", "optim:\n  max_steps: 10.5\n", [], ["optim.max_steps=10.5", "integer"]),
    ("bool_for_int", "seed: true\n", [], ["seed=True", "integer"]),
    (
        "string_for_bool",
        "model:\n  gradient_checkpointing: 'no'\n",
        [],
        ["model.gradient_checkpointing='no'", "true or false"],
    ),
    ("not_finite", "optim:\n  max_grad_norm: .nan\n", [], ["optim.max_grad_norm=nan", "finite"]),
    ("negative_lr", "optim:\n  lr: -0.1\n", [], ["optim.lr=-0.1", "> 0"]),
    ("warmup_one", "optim:\n  warmup_ratio: 1.0\n", [], ["optim.warmup_ratio=1.0", "< 1"]),
    ("zero_batch", "optim:\n  batch_size: 0\n", [], ["optim.batch_size=0", ">= 1"]),
    ("zero_cpus", "scaling:\n  cpus_per_worker: 0\n", [], ["scaling.cpus_per_worker=0.0", "> 0"]),
    ("rank_zero", "adapter:\n  r: 0\n", [], ["adapter.r=0", ">= 1"]),
    (
        "dropout_range",
        "adapter:\n  dropout: 1.5\n",
        [],
        ["adapter.dropout=1.5", "0 <= dropout < 1"],
    ),
    ("unknown_method", "adapter:\n  method: qlora\n", [], ["adapter.method='qlora'", "'melora'"]),
    (
        "unknown_task",
        "task:\n  name: openbookqa2\n",
        [],
        ["task.name='openbookqa2'", "'openbookqa'"],
    ),
    (
        "test_only_task",
        "task:\n  name: mmlu_college_physics\n",
        [],
        ["task.name='mmlu_college_physics'", "only a test split"],
    ),
    (
        "unknown_ood_task",
        "task:\n  ood_tasks: [arc_easy, nope]\n",
        [],
        ["task.ood_tasks[1]='nope'", "arc_easy"],
    ),
    (
        "ood_is_train_task",
        "task:\n  name: demo\n  ood_tasks: [demo]\n",
        [],
        ["task.ood_tasks=['demo']", "training task 'demo'"],
    ),
    ("unknown_field", "optim:\n  lrr: 0.1\n", [], ["'optim.lrr'", "did you mean 'lr'", "kl_lr"]),
    ("unknown_adapter_field", "adapter:\n  rank: 8\n", [], ["'adapter.rank'", "sigma_p"]),
    ("unknown_section", "optimizer:\n  lr: 0.1\n", [], ["'optimizer'", "top level", "optim"]),
    ("section_not_mapping", "optim: 5\n", [], ["optim=5", "mapping", "max_steps"]),
    (
        "unknown_schedule",
        "optim:\n  schedule: exponential\n",
        [],
        ["optim.schedule='exponential'", "'cosine'"],
    ),
    (
        "unknown_select_metric",
        "eval:\n  select_metric: val/loss\n",
        [],
        ["eval.select_metric='val/loss'", "'val/nll'"],
    ),
    ("zero_stage_1", "scaling:\n  zero_stage: 1\n", [], ["scaling.zero_stage=1", "[0, 2, 3]"]),
    ("empty_n_samples", "eval:\n  n_samples: []\n", [], ["eval.n_samples=[]", "non-empty"]),
    (
        "repeated_n_samples",
        "eval:\n  n_samples: [1, 1]\n",
        [],
        ["eval.n_samples=[1, 1]", "distinct"],
    ),
    (
        "missing_data_dir",
        "task:\n  data_dir: /no/such/data/dir\n",
        [],
        ["task.data_dir='/no/such/data/dir'", "no such folder"],
    ),
    (
        "missing_model_dir",
        "model:\n  name_or_path: ./no_such_model\n",
        [],
        ["model.name_or_path='./no_such_model'", "no such folder"],
    ),
    ("bad_run_name", "name: ../escape\n", [], ["name='../escape'", "letters, digits"]),
    (
        "malformed_yaml",
        "optim:\n  lr: [0.1, 0.2\nseed: 3\n",
        [],
        ["config.yaml line 3", "malformed YAML"],
    ),
    (
        "repeated_key",
        "optim:\n  lr: 0.1\n  lr: 0.2\n",
        [],
        ["config.yaml line 3", "'lr' appears twice"],
    ),
    ("top_level_list", "- model\n- adapter\n", [], ["top level must be a mapping", "list"]),
    (
        "zero0_bf16",
        "scaling:\n  zero_stage: 0\n  use_gpu: true\n",
        [],
        ["scaling.zero_stage=0", "bf16", "model.dtype='auto'", "zero_stage 2"],
    ),
    (
        "gpus_without_gpu",
        "scaling:\n  gpus_per_worker: 1\n",
        [],
        ["scaling.gpus_per_worker=1.0", "use_gpu=false"],
    ),
    (
        "bad_uri_scheme",
        "tracking:\n  tracking_uri: ftp://host/x\n",
        [],
        ["tracking.tracking_uri='ftp://host/x'", "sqlite://"],
    ),
    ("reserved_tag", "tracking:\n  tags: {method: lora}\n", [], ["tracking.tags", "['method']"]),
    ("sweep_not_mapping", "sweep: [1, 2]\n", [], ["sweep=[1, 2]", "mapping"]),
    ("set_without_equals", "", ["optim.lr"], ["--set 'optim.lr'", "key=value"]),
    ("set_bad_key", "", ["optim..lr=1"], ["--set 'optim..lr=1'", "dotted key"]),
    ("set_unknown_key", "", ["optim.foo=1"], ["'optim.foo'", "allowed keys in optim"]),
    ("set_below_a_value", "", ["optim.lr.x=1"], ["'optim.lr.x'", "'optim.lr' is a value"]),
    (
        "set_bad_yaml",
        "",
        ["task.ood_tasks=[a, b"],
        ["--set 'task.ood_tasks=[a, b'", "not valid YAML"],
    ),
    ("set_wrong_type", "", ["optim.max_steps=lots"], ["optim.max_steps='lots'", "integer"]),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, overrides, fragments", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_names_the_problem(
    workdir: Path, text: str, overrides: list[str], fragments: list[str]
) -> None:
    path = _write(workdir, text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert sorted(p.name for p in workdir.iterdir()) == ["config.yaml"], (
        "validation wrote something"
    )


def test_there_are_at_least_20_bad_inputs() -> None:
    assert len(BAD_INPUTS) >= 20


def test_missing_file(workdir: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file 'nope\.yaml' not found"):
        load_config("nope.yaml")


def test_password_in_tracking_uri_is_refused_without_echoing_it(workdir: Path) -> None:
    path = _write(workdir, "tracking:\n  tracking_uri: https://me:hunter2@mlflow.example.org\n")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD") as info:
        load_config(path)
    assert "hunter2" not in str(info.value)


def test_defaults_are_the_demo_with_the_papers_table_7_values() -> None:
    cfg = RunConfig()
    assert (
        cfg.model.name_or_path,
        cfg.task.name,
        cfg.scaling.num_workers,
        cfg.scaling.use_gpu,
    ) == ("demo", "demo", 2, False)
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.dropout, cfg.adapter.sigma_p) == (
        8,
        16.0,
        0.1,
        0.2,
    )
    o = cfg.optim
    assert (
        o.lr,
        o.warmup_ratio,
        o.schedule,
        o.batch_size,
        o.kl_lr,
        o.kl_optimizer,
        o.max_steps,
    ) == (1e-4, 0.02, "linear", 4, 1e-4, "sgd", 5000)
    assert (cfg.task.max_length, cfg.eval.eval_every, cfg.eval.n_samples, cfg.eval.ece_bins) == (
        300,
        100,
        (0, 1, 10),
        15,
    )
    assert cfg.run_name == "melora-demo-seed1"


def test_every_field_has_a_one_line_help() -> None:
    for cls in [RunConfig, *SECTIONS.values()]:
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "")
            assert text and "\n" not in text, f"{cls.__name__}.{f.name} lacks a one-line help"


def test_yaml_round_trip_gives_an_equal_config(workdir: Path) -> None:
    cfg = RunConfig().with_overrides(
        {
            "name": "rt",
            "seed": 3,
            "adapter.method": "blob",
            "adapter.target_modules": ["q_proj", "k_proj", "v_proj"],
            "task.ood_tasks": ["demo_ood"],
            "task.data_dir": str(workdir),
            "optim.max_grad_norm": None,
            "optim.weight_decay": 1e-5,
            "eval.n_samples": [0, 5],
            "tracking.tags": {"owner": "me"},
        }
    )
    path = workdir / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    # the file itself holds the values set above (read by plain YAML, not by the config code)
    raw = yaml.safe_load(path.read_text())
    assert (raw["name"], raw["seed"], raw["adapter"]["method"]) == ("rt", 3, "blob")
    assert raw["adapter"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert raw["task"]["ood_tasks"] == ["demo_ood"] and raw["task"]["data_dir"] == str(workdir)
    assert raw["optim"]["max_grad_norm"] is None and raw["optim"]["weight_decay"] == 1e-5
    assert raw["eval"]["n_samples"] == [0, 5] and raw["tracking"]["tags"] == {"owner": "me"}
    again = load_config(path)
    assert again == cfg
    assert (again.name, again.seed, again.adapter.method) == ("rt", 3, "blob")
    assert again.adapter.target_modules == ("q_proj", "k_proj", "v_proj")
    assert again.optim.max_grad_norm is None and again.eval.n_samples == (0, 5)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_overrides_parse_as_yaml_and_win_over_the_file(workdir: Path) -> None:
    path = _write(workdir, "optim:\n  lr: 1e-4\n  max_steps: 100\nadapter:\n  sigma_p: 0.3\n")
    cfg = load_config(
        path,
        [
            "adapter.sigma_p=0.1",
            "optim.max_steps=20",
            "optim.max_steps=30",  # the last one wins
            "task.ood_tasks=[arc_easy,arc_challenge]",
            "optim.max_grad_norm=null",
            "tracking.tags.owner=me",
            "eval.select_metric=val/acc",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(
        cfg.optim.lr, float
    )  # YAML 1.1 would read 1e-4 as text
    assert cfg.adapter.sigma_p == 0.1
    assert cfg.optim.max_steps == 30
    assert cfg.task.ood_tasks == ("arc_easy", "arc_challenge")
    assert cfg.optim.max_grad_norm is None
    assert cfg.tracking.tags == {"owner": "me"}
    assert cfg.eval.select_mode == "max"


def test_parse_overrides_values() -> None:
    assert parse_overrides(["a.b=3e-4", "c=[1, 2]", "d=true", "e=", "f=x=y"]) == [
        ("a.b", 3e-4),
        ("c", [1, 2]),
        ("d", True),
        ("e", None),
        ("f", "x=y"),
    ]


def test_sweep_section_is_ignored_by_load_config_and_returned_by_load_experiment(
    workdir: Path,
) -> None:
    sweep = {"grid": {"adapter.sigma_p": [0.1, 0.2]}, "seeds": [1, 2, 3]}
    path = _write(workdir, yaml.safe_dump({"optim": {"max_steps": 7}, "sweep": sweep}))
    assert load_config(path).optim.max_steps == 7
    cfg, got = load_experiment(path, ["sweep.seeds=[4]"])
    assert cfg == RunConfig().with_overrides({"optim.max_steps": 7})  # the file's base, no sweep
    assert got == {**sweep, "seeds": [4]}
    assert load_experiment(_write(workdir, "seed: 2\n"))[1] == {}


def test_empty_file_gives_the_defaults(workdir: Path) -> None:
    assert load_config(_write(workdir, "")) == RunConfig()


def test_with_overrides_validates_and_leaves_the_original() -> None:
    cfg = RunConfig()
    with pytest.raises(ConfigError, match=r"adapter\.sigma_p=-1"):
        cfg.with_overrides({"adapter.sigma_p": -1})
    assert cfg.with_overrides({"adapter.sigma_p": 0.5}).adapter.sigma_p == 0.5
    assert cfg.adapter.sigma_p == 0.2


def test_flat_params_are_dotted_scalars() -> None:
    cfg = RunConfig(adapter=AdapterConfig(sigma_p=0.3), name="p")
    flat = cfg.flat_params()
    leaf_fields = 2 + sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    assert len(flat) == leaf_fields
    assert flat["adapter.sigma_p"] == 0.3
    assert flat["name"] == "p"
    assert flat["adapter.target_modules"] == '["q_proj", "v_proj"]'
    assert flat["eval.n_samples"] == "[0, 1, 10]"
    assert flat["task.data_dir"] == "null"
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


def test_lora_may_run_under_zero3_and_joint_kl_too() -> None:
    assert (
        RunConfig()
        .with_overrides({"adapter.method": "lora", "scaling.zero_stage": 3})
        .scaling.zero_stage
        == 3
    )
    assert (
        RunConfig()
        .with_overrides({"optim.kl_optimizer": "joint", "scaling.zero_stage": 3})
        .scaling.zero_stage
        == 3
    )


def test_bf16_is_fine_with_zero_2_and_fp32_with_zero_0() -> None:
    assert (
        RunConfig().with_overrides({"scaling.use_gpu": True}).model.resolved_dtype(on_gpu=True)
        == "bfloat16"
    )
    cfg = RunConfig().with_overrides(
        {"scaling.zero_stage": 0, "scaling.use_gpu": True, "model.dtype": "float32"}
    )
    assert cfg.model.resolved_dtype(on_gpu=True) == "float32"
    assert (
        RunConfig().with_overrides({"model.dtype": "bfloat16"}).model.resolved_dtype(on_gpu=False)
        == "bfloat16"
    )
    assert RunConfig().model.resolved_dtype(on_gpu=False) == "float32"


def test_select_mode_follows_the_metric() -> None:
    modes = {
        m: RunConfig().with_overrides({"eval.select_metric": m}).eval.select_mode
        for m in ("val/nll", "val/acc", "val/ece", "val/brier")
    }
    assert modes == {"val/nll": "min", "val/acc": "max", "val/ece": "min", "val/brier": "min"}


def test_resources_per_worker() -> None:
    assert RunConfig().scaling.resources_per_worker() == {"CPU": 0.5}
    gpu = RunConfig().with_overrides({"scaling.use_gpu": True, "scaling.cpus_per_worker": 4})
    assert gpu.scaling.resources_per_worker() == {"CPU": 4.0, "GPU": 1.0}
    half = gpu.with_overrides({"scaling.gpus_per_worker": 0.5})
    assert half.scaling.resources_per_worker() == {"CPU": 4.0, "GPU": 0.5}


def test_storage_path_resolution(workdir: Path) -> None:
    assert RunConfig().tracking.resolved_storage_path() == str(workdir.resolve() / "ray_results")
    rel = RunConfig().with_overrides({"tracking.storage_path": "out/ray"})
    assert rel.tracking.resolved_storage_path() == str(workdir.resolve() / "out" / "ray")
    s3 = RunConfig().with_overrides({"tracking.storage_path": "s3://bucket/runs"})
    assert s3.tracking.resolved_storage_path() == "s3://bucket/runs"
    assert not (workdir / "ray_results").exists()


def test_sections_must_be_section_objects() -> None:
    with pytest.raises(ConfigError, match="use RunConfig.from_dict"):
        RunConfig(optim={"lr": 0.1})  # type: ignore[arg-type]
