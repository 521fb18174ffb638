"""orchestrator.report.rows: which method row a run makes."""

from __future__ import annotations

from orchestrator.report.rows import method_row


def test_method_rows() -> None:
    assert method_row("lora", {"optim.weight_decay": "1e-05"}) == "MAP"
    assert method_row("lora", {"optim.weight_decay": "0.0"}) == "LoRA"
    assert method_row("melora", {"adapter.prior_noise": "True"}) == "Me-LoRA"
    assert method_row("melora", {"adapter.prior_noise": "False"}) == "Me-LoRA w/o noise"
    assert [method_row(m, {}) for m in ("blob", "mcd", "ens", "lap")] == [
        "BLoB",
        "MCD",
        "ENS",
        "LAP",
    ]
