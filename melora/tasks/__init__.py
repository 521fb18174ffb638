"""The paper's evaluation tasks, both reference prompt styles and split policies, and batching.

    >>> splits = load_task("arc_challenge", split_policy="paper", data_dir="../shared/data")
    >>> loader = make_loader(splits["train"], tokenizer, batch_size=4, shuffle=True, seed=0)

A batch holds left-padded `input_ids` / `attention_mask`, class `labels`, the task's
`answer_token_ids` and a per-row `choice_mask`; `logits[:, -1, answer_token_ids]` are the class
logits (see `melora.tasks.batching`).
"""

from melora.tasks.batching import (
    MAX_LENGTH,
    Collator,
    answer_token_ids,
    encode,
    fit_prompt,
    make_collator,
    make_loader,
    pad_token_id,
    token_ids,
)
from melora.tasks.demo import demo_model_config, demo_tokenizer
from melora.tasks.errors import TaskError
from melora.tasks.loading import SPLIT_POLICIES, load_task, split_plan
from melora.tasks.prompts import PROMPT_STYLES, render
from melora.tasks.registry import TASKS, TaskSpec, get_task

__all__ = [
    "MAX_LENGTH",
    "PROMPT_STYLES",
    "SPLIT_POLICIES",
    "TASKS",
    "Collator",
    "TaskError",
    "TaskSpec",
    "answer_token_ids",
    "demo_model_config",
    "demo_tokenizer",
    "encode",
    "fit_prompt",
    "get_task",
    "load_task",
    "make_collator",
    "make_loader",
    "pad_token_id",
    "render",
    "split_plan",
    "token_ids",
]
