"""Left-padded evaluation batches give the answer logits of the same prompts run one by one.

transformers 5.x's SDPA mask no longer unmasks the rows of padding positions (they attend to
nothing); some kernels return NaN there, and a NaN in a padding row's values would reach the real
tokens through 0 x NaN in the next layer. Evaluation left-pads batches of 8, so: real prompts
(ARC-Easy, laplace style), the real stories260K checkpoint loaded as `worker.build_model` loads
it, a Me-LoRA adapter attached, padded batch vs each prompt alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import melora
from melora.evaluation import class_logits
from melora.tasks import load_task, make_loader
from orchestrator.config import RunConfig
from orchestrator.train.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_padded_and_unpadded_answer_logits_agree(stories_dir: Path, data_dir: Path) -> None:
    run = RunConfig().with_overrides(
        {
            "model.name_or_path": str(stories_dir),
            "task.name": "arc_easy",
            "task.data_dir": str(data_dir),
            "scaling.zero_stage": 2,
        }
    )
    tokenizer, model = build_model(run, {}, on_gpu=False)
    assert tokenizer.padding_side == "left"
    torch.manual_seed(0)
    melora.attach(model, run.adapter)
    with torch.no_grad():  # a non-trivial adapter: B = 0 would hide it
        for _, layer in melora.adapters.adapted_layers(model):
            layer.lora_B.normal_(0, 0.5)
    model.eval()
    test = load_task("arc_easy", "paper", str(data_dir), "laplace", splits=("test",))["test"]
    # 16 prompts of very different lengths: the padding of the shortest is long
    lengths = [len(tokenizer(p)["input_ids"]) for p in test.select(range(200))["prompt"]]
    order = sorted(range(200), key=lengths.__getitem__)
    subset = test.select(order[:8] + order[-8:])
    with torch.no_grad():
        batched = torch.cat(
            [class_logits(model, b) for b in make_loader(subset, tokenizer, 8, max_length=512)]
        )
    batch = next(iter(make_loader(subset, tokenizer, 16, max_length=512)))
    pads = (batch["attention_mask"] == 0).sum(1)
    assert pads.max() >= 100  # some rows are mostly padding
    with torch.no_grad():
        alone = torch.cat(
            [class_logits(model, b) for b in make_loader(subset, tokenizer, 1, max_length=512)]
        )
    present = torch.isfinite(alone)  # -inf marks a 5th choice that a 4-choice row lacks
    assert present.sum(1).min() >= 3 and not batched.isnan().any()
    assert torch.equal(torch.isfinite(batched), present)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
