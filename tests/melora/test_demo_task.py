"""The bundled demo task is learnable by the demo's tiny random Llama with LoRA on q and v only,
and its OOD variant is clearly harder (the promise the demo run and the benchmarks rely on)."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaForCausalLM

import melora
from melora.tasks import demo_model_config, demo_tokenizer, load_task, make_loader


@pytest.fixture
def one_thread():
    """One intra-op thread: faster than two for this tiny model on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _class_logits(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -1, batch["answer_token_ids"]].masked_fill(
        ~batch["choice_mask"], float("-inf")
    )


def _accuracy(model, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            right += (_class_logits(model, batch).argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
    return right / total


def test_lora_on_q_and_v_learns_the_demo_and_the_ood_variant_is_harder(one_thread) -> None:
    tokenizer = demo_tokenizer()
    splits = load_task("demo")
    ood = load_task("demo_ood")["test"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(demo_model_config(tokenizer))
    melora.attach(
        model,
        melora.AdapterConfig(
            method="lora", r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj")
        ),
    )
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}  # nothing but the adapters on q and v learns

    steps = 200
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps)
    )
    train = make_loader(splits["train"], tokenizer, batch_size=32, shuffle=True, seed=0)
    start, step = time.perf_counter(), 0
    model.train()
    while step < steps:
        for batch in train:
            loss = torch.nn.functional.cross_entropy(_class_logits(model, batch), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                break
    seconds = time.perf_counter() - start

    id_acc = _accuracy(model, make_loader(splits["test"], tokenizer, batch_size=250))
    ood_acc = _accuracy(model, make_loader(ood, tokenizer, batch_size=250))
    print(
        f"demo: {steps} steps in {seconds:.1f} s; test accuracy {id_acc:.3f}, OOD accuracy {ood_acc:.3f}"
    )
    assert id_acc >= 0.8
    assert ood_acc <= id_acc - 0.15


def test_demo_small_is_the_demo_with_a_small_training_set() -> None:
    small, full = load_task("demo_small", "paper"), load_task("demo", "paper")
    assert len(small["train"]) == 32
    assert small["train"]["prompt"] == full["train"]["prompt"][:32]
    for split in ("validation", "test"):
        assert small[split]["prompt"] == full[split]["prompt"]
        assert small[split]["label"] == full[split]["label"]


def test_demo_shift_keeps_the_label_space_and_shifts_the_votes() -> None:
    """OOD AUROC against demo_shift measures the model, not the number of choices."""
    shift = load_task("demo_shift", "paper", splits=("test",))["test"]
    test = load_task("demo", "paper", splits=("test",))["test"]
    assert set(shift["n_choices"]) == set(test["n_choices"]) == {3, 4}
    assert set(shift["label"]) == set(test["label"]) == {0, 1, 2, 3}
    assert not set(shift["prompt"]) & set(test["prompt"])

    def shown_votes(prompt: str) -> int:
        return len(prompt.split("Votes so far: ")[1].split()[0])

    assert min(shown_votes(p) for p in shift["prompt"]) >= 16  # the ID set shows 8 to 14
    assert max(shown_votes(p) for p in test["prompt"]) <= 14
