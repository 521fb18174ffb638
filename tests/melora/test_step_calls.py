"""Issue 14's targets, as counts (deterministic on any machine, unlike times): the computing calls
of one training step (on a GPU, about its kernel launches) that BLoB and Me-LoRA add to LoRA's,
counted by `benchmarks/adapter_cost.py` with its default settings (8 blocks, q/v, r 8, foreach
optimisers, BLoB without flipout as the paper's rows) on its "tiny" widths: the same code path as
the default "small" model, and the same counts (LoRA 1,164, Me-LoRA +111 joint / +101 sgd; BLoB's
KL two calls fewer, copies inside a reduction that depend on the tensor's size), in a few seconds."""

from __future__ import annotations

import pytest
import torch

KL_OPTIMIZERS = ("joint", "sgd")


def extra_calls(ac, layers: int | None, kl_optimizers=KL_OPTIMIZERS) -> dict:
    """{kl_optimizer: (adapted layers, LoRA's step calls, {method: calls beyond LoRA's step})}."""
    argv = ["--counts", "--model", "tiny", "--seq", "16"] + (
        [] if layers is None else ["--layers", str(layers)]
    )
    args = ac.parse_args(argv)
    models = ac.build_models(ac.build_base(args), args)
    ids = torch.randint(32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    targets = ids[:, -1]
    out = {}
    for kl_optimizer in kl_optimizers:
        args.kl_optimizer = kl_optimizer
        trainers = {
            name: ac.Trainer.create(name, model, ids, targets, args)
            for name, model in models.items()
        }
        steps = {}
        for name, trainer in trainers.items():
            trainer.step()  # the first step creates the optimiser state: count the second
            steps[name] = ac.kernel_ops(trainer)
        adapted = sum(1 for _ in ac.melora.adapted_layers(models["lora"]))
        extra = {name: n - steps["lora"] for name, n in steps.items()}
        out[kl_optimizer] = (adapted, steps["lora"], extra)
    return out


@pytest.fixture(scope="module")
def adapter_cost(load_script):
    return load_script("benchmarks/adapter_cost.py")


def test_bayesian_steps_add_at_most_10_and_15_percent_of_loras_calls(adapter_cost) -> None:
    for kl_optimizer, (adapted, lora, extra) in extra_calls(adapter_cost, None).items():
        assert adapted == 16  # 8 blocks x q, v
        assert extra["melora"] <= 0.10 * lora, (kl_optimizer, extra, lora)
        assert extra["blob"] <= 0.15 * lora, (kl_optimizer, extra, lora)  # without flipout


def test_bayesian_calls_grow_by_a_few_per_adapted_layer(adapter_cost) -> None:
    small, large = extra_calls(adapter_cost, 1), extra_calls(adapter_cost, 3)
    for kl_optimizer in KL_OPTIMIZERS:
        (n1, _, e1), (n2, _, e2) = small[kl_optimizer], large[kl_optimizer]
        for method, most in (("melora", 4), ("blob", 6)):
            slope = (e2[method] - e1[method]) / (n2 - n1)
            assert slope <= most, (kl_optimizer, method, slope)
