"""Hostile inputs through `jobs/sweep.py --dry-run`, and secrets kept out of everything written.

Each hostile input is refused with exit status 2 and a short message that names the field and
the value (a huge value is cut), without a traceback, and with nothing written (no mlflow.db, no
ray_results). Nothing here starts Ray or MLflow: a dry run only plans, and the writers of the
secrets test are called directly, with MLflow's client replaced by one that writes files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SWEEP_PY = REPO / "jobs" / "sweep.py"
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
MAX_MESSAGE = 2000  # characters: a huge value is cut, never echoed whole
HEAVY = ("ray", "deepspeed", "transformers")  # a dry run must not wait on importing these


def bomb(levels: int, width: int) -> str:
    """A YAML 'billion laughs' list: anchor i is `width` aliases of anchor i-1, so the last of
    them expands to width**levels values while the text stays a few hundred characters."""
    parts = [f"&l0 [{', '.join(['1'] * width)}]"]
    parts += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def lines(**sections: object) -> str:
    """A config file's text from sections given as plain data (flow style, one line each)."""
    return "".join(
        f"{k}: {yaml.safe_dump(v, default_flow_style=True).strip()}\n" for k, v in sections.items()
    )


RANDOM_SPACE = "  space: {adapter.sigma_p: {uniform: [0.1, 1.0]}}\n"
SMALL = "optim: {max_steps: 100}\neval: {eval_every: 50}\n"  # a short run, so eval fits


@dataclass(frozen=True)
class Case:
    """A hostile input: the config file's text (None: the demo) and extra arguments; the message
    must contain every one of `needles` and none of `absent`."""

    id: str
    text: str | bytes | None
    args: tuple[str, ...] = ()
    needles: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


CASES = [
    # ----- the file itself
    Case("non_utf8", b"seed: 1\nname: caf\xe9\n", needles=("UTF-8", "0xe9", "line 2")),
    Case("utf16", "seed: 1\n".encode("utf-16"), needles=("UTF-8", "0xff", "line 1")),
    Case("binary_garbage", bytes(range(256)) * 4, needles=("UTF-8", "0x80")),
    Case("nul_byte", "seed: 1\n\x00\n", needles=("malformed YAML", "line 2")),
    Case("empty_file", "", needles=("hostile.yaml", "empty")),
    Case("comments_only", "# nothing here\n", needles=("hostile.yaml", "empty")),
    Case("top_level_list", "- a\n- b\n", needles=("top level", "list")),
    Case("top_level_scalar", "42\n", needles=("top level", "int")),
    Case("duplicate_key", "seed: 1\nseed: 2\n", needles=("'seed' appears twice", "line 2")),
    Case("duplicate_nested", "optim:\n  lr: 0.1\n  lr: 0.2\n", needles=("'lr' appears twice",)),
    Case("two_documents", "seed: 1\n---\nseed: 2\n", needles=("malformed YAML", "line 2")),
    Case("tab_indent", "optim:\n\tlr: 0.1\n", needles=("malformed YAML", "line 2")),
    Case("too_big", "# " + "x" * 2_000_000 + "\nseed: 1\n", needles=("hostile.yaml", "too large")),
    Case("list_as_key", "? [a, b]\n: 1\n", needles=("mapping key", "a list", "line 1")),
    Case("dict_as_key", "optim:\n  ? {lr: 1}\n  : 2\n", needles=("mapping key", "a mapping", "line 2")),
    Case("python_object", "seed: !!python/object/apply:os.system ['touch pwned']\n", needles=("malformed YAML", "line 1")),
    Case("deep_brackets", "seed: " + "[" * 100_000 + "]" * 100_000 + "\n", needles=("line 1", "nested more than")),
    Case("deep_mappings", "seed: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n", needles=("line 1", "nested more than")),
    Case("huge_int_digits", "seed: " + "9" * 5000 + "\n", needles=("line 1", "5000 digits")),
    # ----- YAML aliases: a value that expands to millions, or contains itself
    Case("alias_bomb_value", f"adapter:\n  sigma_p: {bomb(9, 9)}\n", needles=("adapter.sigma_p", "100000 values")),
    Case("alias_bomb_tags", f"tracking:\n  tags:\n    owner: {bomb(9, 9)}\n", needles=("tracking.tags.owner", "100000 values")),
    Case("alias_bomb_grid", f"sweep:\n  grid:\n    seed: {bomb(9, 9)}\n", needles=("sweep.grid.seed", "100000 values")),
    Case("alias_bomb_set", "seed: 1\n", ("--set", f"sweep.grid={{seed: {bomb(9, 9)}}}"), needles=("sweep.grid", "100000 values")),
    Case("alias_medium_value", f"seed: {bomb(6, 6)}\n", needles=("seed=[[1, 1, 1", "must be an integer")),
    Case("alias_medium_grid", f"sweep:\n  grid:\n    seed: {bomb(6, 6)}\n", needles=("seed=", "must be an integer")),
    Case("alias_recursive_grid", "sweep:\n  grid:\n    seed: &a [1, *a]\n", needles=("sweep.grid.seed", "contains itself")),
    Case("alias_recursive_tags", "tracking:\n  tags: &t {a: *t}\n", needles=("line 2", "recursive")),
    # ----- sizes: refused before anything is expanded
    Case("random_1e8", f"sweep:\n  search: random\n  num_samples: 100000000\n{RANDOM_SPACE}", needles=("sweep.num_samples=100000000", "sweep.max_trials=10000")),
    Case("grid_1000x1000", lines(sweep={"grid": {"adapter.r": list(range(1, 1001)), "seed": list(range(1000))}}), needles=("1000000 trials", "sweep.max_trials=10000")),
    Case("grid_10100", lines(sweep={"grid": {"adapter.r": list(range(1, 102)), "seed": list(range(100))}}), needles=("10100 trials", "sweep.max_trials=10000")),
    Case("subgrid_1000x1000", lines(sweep={"grid": {"method": {"m": {"adapter.r": list(range(1, 1001)), "seed": list(range(1000))}}}}), needles=("sweep.grid.method.m", "1000000")),
    Case("random_x_grid", f"sweep:\n  search: random\n  num_samples: 200\n{RANDOM_SPACE}  grid: {{seed: {list(range(1000))}}}\n", needles=("200000 trials", "sweep.max_trials=10000")),
    Case("max_trials_zero", "sweep:\n  max_trials: 0\n", needles=("sweep.max_trials=0",)),
    Case("max_trials_text", "sweep:\n  max_trials: many\n", needles=("sweep.max_trials='many'",)),
    # ----- numbers out of range
    Case("seed_1e26", "seed: 100000000000000000000000000\n", needles=("seed", "100000000000000000000000000")),
    Case("seed_2_40", "seed: 1099511627776\n", needles=("seed=1099511627776", "2147483647")),
    Case("seed_set_2_64", "seed: 1\n", ("--set", "seed=18446744073709551616"), needles=("seed", "18446744073709551616")),
    Case("seed_negative", "seed: -1\n", needles=("seed=-1",)),
    Case("search_seed_1e26", "sweep:\n  search_seed: 100000000000000000000000000\n", needles=("sweep.search_seed", "100000000000000000000000000")),
    Case("sigma_p_400_digits", f"adapter:\n  sigma_p: 1{'0' * 400}\n", needles=("adapter.sigma_p", "10000000000")),
    Case("rank_float_inf", "adapter:\n  r: 1e400\n", needles=("adapter.r=inf",)),
    Case("lr_nan", "optim:\n  lr: .nan\n", needles=("optim.lr=nan",)),
    Case("lr_inf", "optim:\n  lr: .inf\n", needles=("optim.lr=inf",)),
    Case("lr_negative", "optim:\n  lr: -1.0e-4\n", needles=("optim.lr=-0.0001",)),
    Case("sigma_p_minus_inf", "adapter:\n  sigma_p: -.inf\n", needles=("adapter.sigma_p=-inf",)),
    Case("driver_cpus_nan", "sweep:\n  driver_cpus: .nan\n", needles=("sweep.driver_cpus=nan",)),
    Case("space_to_inf", "sweep:\n  search: random\n  space: {adapter.sigma_p: {uniform: [0.1, .inf]}}\n", needles=("sweep.space.adapter.sigma_p", "inf")),
    Case("space_from_nan", "sweep:\n  search: random\n  space: {adapter.sigma_p: {loguniform: [.nan, 1.0]}}\n", needles=("sweep.space.adapter.sigma_p", "nan")),
    Case("cpus_zero", "scaling:\n  cpus_per_worker: 0\n", needles=("scaling.cpus_per_worker=0",)),
    # ----- settings that are valid alone but cannot run together
    Case("asha_grace_beyond_steps", SMALL + "sweep:\n  scheduler: asha\n  asha: {grace_period: 1000}\n", needles=("sweep.asha.grace_period=1000", "optim.max_steps=100")),
    Case("asha_default_grace", None, ("--set", "sweep.scheduler=asha"), needles=("sweep.asha.grace_period=100", "optim.max_steps=60")),
    Case("eval_every_beyond_steps", "optim: {max_steps: 50}\neval: {eval_every: 100}\n", needles=("eval.eval_every=100", "optim.max_steps=50")),
    Case("eval_every_fixed", None, ("--set", "sweep.fixed.eval.eval_every=1000"), needles=("eval.eval_every=1000", "optim.max_steps=60")),
    Case("set_hidden_by_fixed", None, ("--set", "optim.max_steps=5000"), needles=("optim.max_steps=5000", "sweep.fixed.optim.max_steps=60")),
    Case("set_section_hidden_by_fixed", None, ("--set", "optim={max_steps: 5000}"), needles=("optim.max_steps=5000", "sweep.fixed.optim.max_steps=60")),
    Case("set_hidden_by_grid", None, ("--set", "seed=7"), needles=("seed=7", "sweep.grid.method")),
    Case("set_hidden_by_space", SMALL + f"sweep:\n  search: random\n{RANDOM_SPACE}", ("--set", "adapter.sigma_p=0.5"), needles=("adapter.sigma_p=0.5", "sweep.space.adapter.sigma_p")),
    # ----- names that become paths
    Case("name_empty", None, ("--name", ""), needles=("--name", "''")),
    Case("name_dotdot", None, ("--name", "../evil"), needles=("--name", "'../evil'")),
    Case("name_slash", None, ("--name", "a/b"), needles=("--name", "'a/b'")),
    Case("name_newline", None, ("--name", "demo\n"), needles=("--name", "'demo\\n'")),
    Case("name_huge", None, ("--name", "x" * 100_000), needles=("--name", "'xxxxxxxxxx")),
    Case("sweep_name_dotdot", "sweep:\n  name: ../../etc\n", needles=("sweep.name='../../etc'",)),
    Case("sweep_name_int", "sweep:\n  name: 5\n", needles=("sweep.name=5",)),
    Case("experiment_dotdot", "tracking:\n  experiment: ../../tmp/x\n", needles=("tracking.experiment='../../tmp/x'",)),
    Case("experiment_slash", "tracking:\n  experiment: a/b\n", needles=("tracking.experiment='a/b'",)),
    Case("experiment_dots", "tracking:\n  experiment: '..'\n", needles=("tracking.experiment='..'",)),
    Case("run_name_dotdot", "name: ../x\n", needles=("name='../x'",)),
    Case("axis_choice_name", "sweep:\n  grid:\n    method:\n      ../x: {adapter.method: lora}\n", needles=("sweep.grid.method", "'../x'")),
    # ----- wrong types
    Case("list_for_int", "optim:\n  max_steps: [1]\n", needles=("optim.max_steps=[1]", "integer")),
    Case("string_for_bool", "scaling:\n  use_gpu: 'yes'\n", needles=("scaling.use_gpu='yes'",)),
    Case("bool_for_int", "optim:\n  max_steps: true\n", needles=("optim.max_steps=True", "integer")),
    Case("bool_for_sweep_int", "sweep:\n  num_samples: true\n", needles=("sweep.num_samples=True",)),
    Case("float_for_int", "scaling:\n  num_workers: 2.5\n", needles=("scaling.num_workers=2.5",)),
    Case("string_for_adapter_int", "adapter:\n  r: '8'\n", needles=("adapter.r='8'",)),
    Case("int_for_adapter_bool", "adapter:\n  prior_noise: 1\n", needles=("adapter.prior_noise=1",)),
    Case("int_for_list", "eval:\n  n_samples: 10\n", needles=("eval.n_samples=10", "list")),
    Case("string_for_list", "task:\n  ood_tasks: arc_easy\n", needles=("task.ood_tasks='arc_easy'", "list")),
    Case("list_for_tags", "tracking:\n  tags: [a]\n", needles=("tracking.tags=['a']", "mapping")),
    Case("date_for_seed", "seed: 2001-01-01\n", needles=("seed=datetime.date(2001, 1, 1)",)),
    Case("bytes_for_seed", "seed: !!binary aGVsbG8=\n", needles=("seed=b'hello'",)),
    Case("set_for_seed", "seed: !!set {1, 2}\n", needles=("seed=", "integer")),
    Case("list_for_sweep", "sweep: [1, 2]\n", needles=("sweep=[1, 2]", "mapping")),
    Case("string_for_section", "optim: fast\n", needles=("optim='fast'", "mapping")),
    Case("list_for_metric", "sweep:\n  metric: [val/nll]\n", needles=("sweep.metric=['val/nll']",)),
    Case("scalar_for_axis", "sweep:\n  grid:\n    seed: 1\n", needles=("sweep.grid.seed=1",)),
    # ----- unknown keys at every level
    Case("unknown_top", "lr: 0.1\n", needles=("unknown key 'lr'",)),
    Case("unknown_in_section", "optim:\n  lrr: 0.1\n", needles=("'optim.lrr'",)),
    Case("unknown_in_adapter", "adapter:\n  rank: 8\n", needles=("adapter.rank",)),
    Case("unknown_in_laplace", "laplace:\n  bogus: 1\n", needles=("'laplace.bogus'",)),
    Case("unknown_in_sweep", "sweep:\n  gird: {}\n", needles=("'sweep.gird'",)),
    Case("unknown_in_asha", "sweep:\n  asha: {grace: 1}\n", needles=("'sweep.asha.grace'", "grace_period")),
    Case("unknown_distribution", SMALL + "sweep:\n  search: random\n  space: {adapter.sigma_p: {normal: [0, 1]}}\n", needles=("sweep.space.adapter.sigma_p",)),
    Case("unknown_in_named_axis", "sweep:\n  grid:\n    method:\n      x: {adapter.bogus: 1}\n", needles=("sweep.grid.method.x.adapter.bogus",)),
    Case("unknown_in_fixed", "sweep:\n  fixed: {optim.bogus: 1}\n", needles=("sweep.fixed.optim.bogus",)),
    Case("huge_unknown_key", "sweep:\n  grid:\n    ? " + "k" * 200_000 + "\n    : [1]\n", needles=("sweep.grid.kkkkkkkk",)),
    # ----- --set and the command line
    Case("set_without_equals", None, ("--set", "optim.lr"), needles=("--set 'optim.lr'", "key=value")),
    Case("set_empty_key", None, ("--set", "=1"), needles=("--set '=1'",)),
    Case("set_bad_yaml", None, ("--set", "sweep.grid={seed: [1"), needles=("--set 'sweep.grid={seed: [1'", "not valid YAML")),
    Case("set_unknown_key", None, ("--set", "adapter.bogus=1"), needles=("'adapter.bogus'",)),
    Case("set_unknown_sweep_key", None, ("--set", "sweep.bogus=1"), needles=("'sweep.bogus'",)),
    Case("set_below_a_value", None, ("--set", "optim.lr.x=1"), needles=("'optim.lr.x'",)),
    Case("set_huge_value", None, ("--set", "adapter.method=" + "x" * 100_000), needles=("adapter.method='xxxxxxxx",)),
    Case("set_missing_argument", None, ("--set",), needles=("--set", "expected one argument")),
    Case("missing_model_folder", None, ("--set", "model.name_or_path=../../no/such/model"), needles=("model.name_or_path='../../no/such/model'",)),
    # ----- tracking: nothing secret is echoed, MLflow's own limits are checked up front
    Case("uri_password", None, ("--set", "tracking.tracking_uri=https://u:hunter2@mlflow.example"), needles=("tracking.tracking_uri", "password"), absent=("hunter2",)),
    Case("uri_bad_scheme_with_secret", None, ("--set", "tracking.tracking_uri=ftp://u:hunter2@host"), needles=("tracking.tracking_uri", "ftp://"), absent=("hunter2",)),
    Case("secret_tag_bad_value", "tracking:\n  tags: {hf_token: [sekrit]}\n", needles=("tracking.tags", "hf_token"), absent=("sekrit",)),
    Case("tag_key_with_at", "tracking:\n  tags: {'a@b': x}\n", needles=("tracking.tags", "'a@b'")),
    Case("tag_key_too_long", f"tracking:\n  tags: {{{'k' * 300}: x}}\n", needles=("tracking.tags", "250")),
]  # fmt: skip
VIA_SUBPROCESS = ("non_utf8", "alias_bomb_grid", "name_empty")


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """An empty working folder (must stay empty) and a folder for the hostile config files."""
    cwd, inputs = tmp_path / "cwd", tmp_path / "in"
    cwd.mkdir()
    inputs.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return SimpleNamespace(cwd=cwd, inputs=inputs)


def argv(case: Case, inputs: Path) -> list[str]:
    """The sweep command line of a case, its config file written into `inputs`."""
    config = DEMO
    if case.text is not None:
        config = inputs / "hostile.yaml"
        data = case.text if isinstance(case.text, bytes) else case.text.encode("utf-8")
        config.write_bytes(data)
    return ["--config", str(config), "--dry-run", *case.args]


def check_refusal(case: Case, status: int, out: str, err: str, dirs: SimpleNamespace) -> None:
    text = out + err
    assert status == 2, f"exit status {status}, not 2\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert len(err) < MAX_MESSAGE, f"a {len(err)}-character message: cut the value\n{err[:500]}"
    for needle in case.needles:
        assert needle in err, f"{needle!r} not in the message:\n{err}"
    for secret in case.absent:
        assert secret not in text, f"{secret!r} echoed:\n{text}"
    assert not any(dirs.cwd.iterdir()), f"written: {sorted(p.name for p in dirs.cwd.iterdir())}"
    assert [p.name for p in dirs.inputs.iterdir()] in ([], ["hostile.yaml"])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_cleanly(case: Case, dirs, sweep_job, capsys) -> None:
    try:
        status = sweep_job.main(argv(case, dirs.inputs))
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    out, err = capsys.readouterr()
    check_refusal(case, status, out, err, dirs)


def test_there_are_at_least_50_distinct_cases() -> None:
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


def run_sweep_py(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """jobs/sweep.py in a fresh interpreter; stderr ends with the heavy modules it imported."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SWEEP_PY)!r}, *{args!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(SWEEP_PY)!r}, run_name='__main__')\n"
        "    status = 0\n"
        "except SystemExit as e:\n"
        "    status = e.code\n"
        f"print('heavy modules:', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("case_id", VIA_SUBPROCESS)
def test_hostile_input_through_a_real_process(case_id: str, dirs) -> None:
    """The exit status and stderr as a shell sees them, and no Ray, DeepSpeed or Transformers."""
    case = next(c for c in CASES if c.id == case_id)
    start = time.monotonic()
    proc = run_sweep_py(argv(case, dirs.inputs), dirs.cwd)
    seconds = time.monotonic() - start
    err, _, heavy = proc.stderr.rpartition("heavy modules:")
    check_refusal(case, proc.returncode, proc.stdout, err, dirs)
    assert err.startswith("config error: ")
    assert heavy.strip() == "[]", f"a dry run imported {heavy.strip()}"
    assert seconds < 120, f"{seconds:.0f} s to refuse"  # a few seconds on an idle machine


# ----- secrets ------------------------------------------------------------------------------------
SECRETS = ("hf_SECRET_tag_1", "SECRET_user_2", "SECRET_query_3", "SECRET_auth_4")
SECRET_URI = f"https://{SECRETS[1]}@mlflow.example:5000/?token={SECRETS[2]}&x=1"
SECRET_TAGS = {"hf_token": SECRETS[0], "X-Auth": SECRETS[3], "owner": "me"}


def secret_config(folder: Path, storage: Path) -> Path:
    """A small sweep (4 trials) whose tags and tracking URI carry the planted secrets."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["tracking"] = {
        "experiment": "secrets",
        "tracking_uri": SECRET_URI,
        "storage_path": str(storage),
        "tags": SECRET_TAGS,
    }
    raw["sweep"]["grid"] = {"method": {"lora": {"adapter.method": "lora"}, "ens": {"adapter.method": "ens"}}, "seed": [1]}  # fmt: skip
    path = folder / "secrets.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def assert_no_secret(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{where} holds {leaked}"


def test_a_dry_run_prints_no_secret_and_imports_nothing_heavy(dirs) -> None:
    config = secret_config(dirs.inputs, dirs.inputs / "storage")
    proc = run_sweep_py(["--config", str(config), "--dry-run"], dirs.cwd)
    assert proc.returncode == 0, proc.stderr
    assert "sweep demo: 4 trials" in proc.stdout  # ENS seed 1 adds members seeds 2, 3
    assert "https://***@mlflow.example:5000/?token=***&x=1" in proc.stdout
    assert_no_secret(proc.stdout + proc.stderr, "the dry run's output")
    assert proc.stderr.rpartition("heavy modules:")[2].strip() == "[]"
    assert not any(dirs.cwd.iterdir())


def test_redaction_of_keys_uris_and_plain_data() -> None:
    from orchestrator.redaction import REDACTED, is_secret_key, redact, redact_uri

    secret = ["hf_token", "HF_TOKEN", "hfToken", "GITHUB_TOKEN", "hftoken", "db.password",
              "passwd", "api_key", "apiKey", "APIKEY", "client_secret", "aws_credentials",
              "X-Auth", "auth", "oauth_header", "authorization", "ssh_key"]  # fmt: skip
    plain = ["owner", "author", "tokenizer", "max_tokens", "monkey", "optim.kl_weighting",
             "task.key_column", "tracking.tags"]  # fmt: skip
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in plain if is_secret_key(k)] == []
    assert redact_uri("https://me:pw@host:5000/x") == "https://***@host:5000/x"
    assert redact_uri("https://tok@host") == "https://***@host"
    assert (
        redact_uri("https://host/x?token=abc&x=1&api_key=k")
        == "https://host/x?token=***&x=1&api_key=***"
    )
    for same in (
        "sqlite:////a/b.db",
        "sqlite:///m.db?mode=ro",
        "http://127.0.0.1:5000",
        "s3://b/p",
    ):
        assert redact_uri(same) == same
    data = {
        "tracking": {"tracking_uri": SECRET_URI, "tags": SECRET_TAGS},
        "notes": [f"see {SECRET_URI} for the runs"],
        "seed": 1,
    }
    clean = redact(data)
    assert clean["tracking"]["tags"] == {"hf_token": REDACTED, "X-Auth": REDACTED, "owner": "me"}
    assert clean["tracking"]["tracking_uri"] == "https://***@mlflow.example:5000/?token=***&x=1"
    assert clean["notes"] == ["see https://***@mlflow.example:5000/?token=***&x=1 for the runs"]
    assert clean["seed"] == 1 and data["tracking"]["tags"]["hf_token"] == SECRETS[0]  # a copy
    assert_no_secret(json.dumps(clean), "redact()'s result")


class FileClient:
    """MLflow's client as the tracking module uses it, writing each call into a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls = 0

    def _write(self, name: str, text: str) -> None:
        self.calls += 1
        path = self.folder / f"{self.calls:03d}-{name.replace('/', '_')}"
        path.write_text(text)

    def create_run(self, experiment_id, run_name=None, tags=None):
        self._write("create_run.json", json.dumps({"name": run_name, "tags": tags}))
        return SimpleNamespace(info=SimpleNamespace(run_id="run0"))

    def log_batch(self, run_id, params=(), metrics=()):
        self._write("params.json", json.dumps({p.key: p.value for p in params}))

    def log_text(self, run_id, text, artifact_file):
        self._write(artifact_file, text)

    def set_tag(self, run_id, key, value):
        self._write("tag.json", json.dumps({key: value}))

    def get_run(self, run_id):  # a new run: no dataset inputs yet
        return SimpleNamespace(inputs=None)

    def log_inputs(self, run_id, datasets=None, models=None):
        records = [
            {"dataset": vars(d.dataset), "tags": {t.key: t.value for t in d.tags}}
            for d in datasets or ()
        ]
        self._write("inputs.json", json.dumps(records, default=str))


def test_every_writer_leaves_no_planted_secret(dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """to_yaml and flat_params (the artifacts and params of every run), the sweep's state file and
    its parent run's params and artifacts, a training run's tags, params, config and marker file."""
    from orchestrator import tracking
    from orchestrator.config import load_experiment
    from orchestrator.sweep import state as sweep_state
    from orchestrator.sweep.plan import plan_sweep
    from orchestrator.train import run_marker, trainer

    storage, logged = dirs.inputs / "storage", dirs.inputs / "mlflow"
    logged.mkdir()
    base, section = load_experiment(secret_config(dirs.inputs, storage))
    plan = plan_sweep(base, section)
    assert plan.tracking_uri == SECRET_URI  # the real URI is kept for connecting
    client = FileClient(logged)
    monkeypatch.setattr(tracking.store, "client", lambda uri: client)
    for where in (tracking, tracking.store):  # the facade's name and the one tracking.runs calls
        monkeypatch.setattr(where, "check_reachable", lambda uri, timeout=5.0: None)
    for where in (tracking, tracking.runs):
        monkeypatch.setattr(
            where, "ensure_experiment", lambda uri, name, artifact_location=None: "0"
        )

    written = dirs.inputs / "written"
    written.mkdir()
    for i, run in enumerate([plan.base, *plan.runs()]):
        (written / f"{i}.yaml").write_text(run.to_yaml())
        (written / f"{i}.json").write_text(json.dumps(run.flat_params()))
    sweep_state.write_state(plan, "parent0")
    sweep_state.log_plan(plan, "parent0")
    tracking.set_tags(SECRET_URI, "parent0", {**SECRET_TAGS, "note": SECRET_URI})
    trial = plan.trials[0].run
    assert trainer.prepare_tracking(trial, parent_run_id="parent0", sweep=plan.name)[1] == "run0"

    files = [p for p in dirs.inputs.rglob("*") if p.is_file() and p.name != "secrets.yaml"]
    names = {p.name for p in files}
    assert run_marker.marker_path(trial).is_file()  # the training run's marker, under storage
    assert any(n.endswith("config_resolved.yaml") for n in names)
    assert any(n.endswith("sweep_base.yaml") for n in names)
    assert any(n.endswith("sweep_trials.json") for n in names)
    assert (plan.sweep_dir / "sweep.json").is_file()
    for path in files:
        assert_no_secret(path.read_text(errors="replace"), str(path.relative_to(dirs.inputs)))
    resolved = next(p for p in files if p.name.endswith("config_resolved.yaml"))
    tags = yaml.safe_load(resolved.read_text())["tracking"]["tags"]
    assert tags["hf_token"] == "***" and tags["owner"] == "me"  # redacted, not dropped silently
    batches = [json.loads(p.read_text()) for p in files if p.name.endswith("params.json")]
    params = next(b for b in batches if "tracking.tags" in b)  # the training run's
    assert json.loads(params["tracking.tags"])["hf_token"] == "***"
    assert params["tracking.tracking_uri"] == "https://***@mlflow.example:5000/?token=***&x=1"


@pytest.mark.parametrize("script", ["jobs/sweep.py", "jobs/train.py"])
def test_prompts_beyond_max_length_are_refused_before_ray_starts(
    script: str, dirs, load_script, capsys
) -> None:
    """Not a dry run: the driver checks every trial's prompts against task.max_length (the demo's
    take 38 tokens at least) and refuses with exit 2 before Ray, MLflow or a state folder exist."""
    import ray

    status = load_script(script).main(["--config", str(DEMO), "--set", "task.max_length=8"])
    out, err = capsys.readouterr()
    case = Case("max_length", None, needles=("task demo, train split", "max_length=8"))
    check_refusal(case, status, out, err, dirs)
    assert not ray.is_initialized()
