"""The Llama2-13B path checked on one GPU, and its cost at 13B size: one command, one table.

    python benchmarks/gpu_check.py                                 # one GPU: under 8 min on an H100
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny   # the same checks, small, on CPU

1. The real path: `jobs/configs/stories260k.yaml` (a pretrained checkpoint loaded by
   `from_pretrained` from a folder, ZeRO-3, Me-LoRA with `kl_optimizer: sgd`, ARC-Easy) through
   Ray Train on one worker: on a GPU with NCCL and bf16 base weights; `--steps` steps, validation
   halfway and at the end, final evaluation at N = 0 and 10. Checked: the MLflow run FINISHED,
   every metric finite; then the answer logits of left-padded batches against the same prompts
   one by one (bf16 tolerance on a GPU).
2. Cost at Llama2-13B size (random weights, bf16; `--tiny`: a 2-layer Llama, fp32, time only):
   LoRA, BLoB (flipout off, as the paper's tables) and Me-LoRA on q/v at r 8, seq
   300, batch 1 and 4, each step the training objective (AdamW on the NLL, then SGD on pi * KL),
   methods interleaved round by round (benchmarks/adapter_cost.py's harness); medians and
   ratios to LoRA of step time and peak step memory.

The table is printed; with `--results` (the default on a GPU: benchmarks/RESULTS.md) it also
replaces the "GPU check" section of that file, with the card's name. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SHARED = REPO.parent / "shared"
SECTION_START, SECTION_END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--tiny", action="store_true", help="small everything (the only way on --device cpu)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default 30; tiny 6)")
    p.add_argument("--model-dir", type=Path, default=SHARED / "models/stories260k/hf_llama")
    p.add_argument("--data-dir", type=Path, default=SHARED / "data")
    p.add_argument("--rounds", type=int, default=None, help="timed cost rounds (12; tiny 3)")
    p.add_argument("--skip-run", action="store_true", help="only the cost part")
    p.add_argument("--skip-cost", action="store_true", help="only the real-path part")
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="Markdown file whose GPU-check section is replaced (default on cuda: "
        "benchmarks/RESULTS.md; on cpu: print only)",
    )
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny: the 13B-size cost part needs a GPU")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA GPU (use --device cpu --tiny on a CPU)")
        if args.results is None:
            args.results = REPO / "benchmarks" / "RESULTS.md"
    if args.steps is None:
        args.steps = 4 if args.tiny else 30
    if args.rounds is None:
        args.rounds = 3 if args.tiny else 12
    for name in ("steps", "rounds"):
        if getattr(args, name) < 2:
            p.error(f"--{name} must be at least 2")
    if not args.skip_run:
        for flag, path in (("--model-dir", args.model_dir), ("--data-dir", args.data_dir)):
            if not path.is_dir():
                p.error(f"{flag} {path}: no such folder")
    return args


# ----- 1. the real path --------------------------------------------------------------------------
def arc_easy_slice(data_dir: Path, out: Path, n: dict[str, int]) -> Path:
    """The first examples of each ARC-Easy split, same files and schema (for --tiny)."""
    (out / "arc_easy").mkdir(parents=True)
    for split, keep in n.items():
        lines = (data_dir / "arc_easy" / f"{split}.jsonl").read_text().splitlines()[:keep]
        (out / "arc_easy" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def real_path(args: argparse.Namespace, tmp: Path) -> list[tuple[str, str, bool]]:
    """Train, evaluate and read back the stories260k run; rows (check, value, ok)."""
    import ray
    from mlflow import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.train.trainer import fit_run, init_ray

    on_gpu = args.device == "cuda"
    data = args.data_dir
    if args.tiny:
        data = arc_easy_slice(data, tmp / "data", {"train": 32, "validation": 8, "test": 16})
    overrides = {
        "model.name_or_path": args.model_dir,
        "model.dtype": "bfloat16" if on_gpu else "float32",
        "task.data_dir": data,
        "scaling.use_gpu": on_gpu,
        "scaling.num_workers": 1 if on_gpu else 2,
        "scaling.cpus_per_worker": 1 if on_gpu else 0.5,
        "scaling.zero_stage": 3,
        "optim.max_steps": args.steps,
        "eval.eval_every": args.steps // 2,
        "eval.n_samples": [0, 10],
        "tracking.tracking_uri": f"sqlite:///{tmp}/mlflow.db",
        "tracking.storage_path": str(tmp / "ray_results"),
    }
    run = load_config(
        REPO / "jobs/configs/stories260k.yaml", [f"{k}={v}" for k, v in overrides.items()]
    )
    init_ray(num_cpus=None if on_gpu else 2)
    t0 = time.perf_counter()
    try:
        result = fit_run(run)
    finally:
        ray.shutdown()
    seconds = time.perf_counter() - t0
    tracked = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
    metrics = tracked.data.metrics
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    rows = [
        ("run (Ray Train, ZeRO-3, from_pretrained)", f"{seconds:.0f} s", True),
        ("backend / base dtype", f"{'nccl' if on_gpu else 'gloo'} / {run.model.dtype}", True),
        ("MLflow run status", tracked.info.status, tracked.info.status == "FINISHED"),
        ("metrics finite", f"{len(metrics) - len(bad)}/{len(metrics)}", not bad),
    ]
    for key in ("test/arc_easy/acc_n0", "test/arc_easy/nll_n0", "test/arc_easy/nll_n10"):
        rows.append((key, f"{metrics.get(key, float('nan')):.4f}", key in metrics))
    rows.append(padding_check(run, on_gpu))
    return rows


def padding_check(run, on_gpu: bool) -> tuple[str, str, bool]:
    """Answer logits of 16 left-padded prompts (batches of 8) vs the same prompts one by one."""
    import torch

    import melora
    from melora.evaluation import class_logits
    from melora.tasks import load_task, make_loader
    from orchestrator.train.model import build_model

    loading = run.with_overrides({"scaling.zero_stage": 2})
    tokenizer, model = build_model(loading, {}, on_gpu)
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(0)
    melora.attach(model, run.adapter)
    model.to(device).eval()
    t = run.task
    test = load_task(t.name, t.split_policy, t.data_dir, t.prompt_style, splits=("test",))["test"]
    n = min(200, len(test))
    lengths = [len(tokenizer(p)["input_ids"]) for p in test.select(range(n))["prompt"]]
    order = sorted(range(n), key=lengths.__getitem__)
    subset = test.select(order[:8] + order[-8:])
    with torch.no_grad():
        batched, alone = (
            torch.cat(
                [class_logits(model, b) for b in make_loader(subset, tokenizer, bs, max_length=512)]
            )
            for bs in (8, 1)
        )
    present = torch.isfinite(alone)
    diff = (batched - alone)[present].abs().max().item()
    tolerance = 0.1 if on_gpu else 1e-4  # bf16 keeps 8 bits: logits of a few units move ~0.03
    ok = not batched.isnan().any() and torch.equal(torch.isfinite(batched), present)
    return ("padded vs unpadded logits, max abs diff", f"{diff:.2e}", ok and diff <= tolerance)


# ----- 2. cost at 13B size -----------------------------------------------------------------------
def cost(args: argparse.Namespace, batch: int) -> dict[str, dict[str, float]]:
    """Median step time and peak step memory per method (adapter_cost.py's harness, SGD KL step)."""
    import adapter_cost as ac
    import torch

    import melora

    ac.MODEL_SIZES.setdefault("tiny", (64, 172, 2, 4))  # hidden, intermediate, layers, heads
    argv = [
        "--model", "tiny" if args.tiny else "llama2-13b",
        "--device", args.device,
        "--batch", str(batch),
        "--seq", "64" if args.tiny else "300",
        "--steps", str(args.rounds),
        "--warmup", "1" if args.tiny else "2",
        "--kl-optimizer", "sgd",
    ]  # fmt: skip
    cfg = ac.parse_args(argv)
    base = ac.build_base(cfg)
    models = ac.build_models(base, cfg)
    del base
    for model in models.values():  # BLoB as the paper's tables: no flipout
        for _, layer in melora.adapters.adapted_layers(model):
            if isinstance(layer, melora.BlobLinear):
                layer.config = dataclasses.replace(layer.config, flipout=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(32000, (cfg.batch, cfg.seq), generator=generator).to(cfg.device)
    targets = torch.randint(32000, (cfg.batch,), generator=generator).to(cfg.device)
    trainers = {
        name: ac.Trainer.create(name, model, ids, targets, cfg) for name, model in models.items()
    }
    times = ac.time_round_robin(trainers, cfg.steps, cfg.warmup, cfg.device)
    out = {}
    for name, trainer in trainers.items():
        out[name] = {
            "ms": statistics.median(times[name]) * 1e3,
            "ratio": statistics.median(
                [t / lora for t, lora in zip(times[name], times["lora"], strict=True)]
            ),
            # on the CPU the profiler that measures it costs minutes: the GPU's allocator only
            "mib": ac.step_extra_bytes(trainer, cfg.device) / 2**20
            if args.device == "cuda"
            else None,
        }
    del trainers, models
    return out


# ----- report ----------------------------------------------------------------------------------------
def device_name(args: argparse.Namespace) -> str:
    import platform

    import torch

    if args.device == "cuda":
        return (
            f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, torch {torch.__version__})"
        )
    return f"CPU {platform.processor() or platform.machine()} (torch {torch.__version__})"


def render(args, path_rows, cost_rows) -> str:
    lines = [f"Device: {device_name(args)}; `{' '.join(sys.argv)}`", ""]
    if path_rows:
        lines += ["| real path check | value | ok |", "|---|---|---|"]
        lines += [f"| {c} | {v} | {'yes' if ok else '**NO**'} |" for c, v, ok in path_rows]
        lines.append("")
    if cost_rows:
        size = (
            "a 2-layer Llama, fp32, seq 64 (--tiny)" if args.tiny else "Llama2-13B, bf16, seq 300"
        )
        lines += [
            f"Cost, {size}, r 8, q/v, SGD KL step; median of {args.rounds} interleaved rounds:",
            "",
            "| batch | method | step ms | ratio to LoRA | step memory MiB |",
            "|---|---|---|---|---|",
        ]
        for batch, rows in cost_rows.items():
            for name, r in rows.items():
                mib = "n/a (cpu)" if r["mib"] is None else f"{r['mib']:.1f}"
                lines.append(f"| {batch} | {name} | {r['ms']:.1f} | {r['ratio']:.3f} | {mib} |")
        lines.append("")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace the GPU-check section of `path` (between its markers), or append one."""
    section = f"{SECTION_START}\n## GPU check (`benchmarks/gpu_check.py`)\n\n{body}\n{SECTION_END}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(SECTION_START) + ".*?" + re.escape(SECTION_END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + "\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path_rows, cost_rows = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_run:
            path_rows = real_path(args, Path(tmp))
    if not args.skip_cost:
        for batch in (1, 4):
            cost_rows[batch] = cost(args, batch)
    body = render(args, path_rows, cost_rows)
    print(body)
    if args.results is not None:
        write_section(args.results, body)
        print(f"written to {args.results}")
    return 0 if all(ok for _, _, ok in path_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
