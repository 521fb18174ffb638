"""A run's data as MLflow dataset inputs (the runs table's Dataset column and the run page's
Datasets): `SplitInput` describes one split, `log_dataset_inputs` logs them, and
`logged_dataset_inputs` reads them back."""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from orchestrator.redaction import redact_text
from orchestrator.tracking import store

DATASET_CONTEXTS = ("train", "validation", "test", "ood")  # a dataset input's mlflow.data.context
DATASET_INSERT_TRIES = 3  # log_dataset_inputs: tries when another run inserted the dataset first
# a unique-key violation, as SQLite, PostgreSQL and MySQL word it
_DUPLICATE_KEY = re.compile(r"UNIQUE constraint failed|duplicate key value|Duplicate entry", re.I)


@dataclass(frozen=True)
class SplitInput:
    """One split of a task that a run trains or is evaluated on, as an MLflow dataset input.

    `rows` (a `datasets.Dataset`) give MLflow's digest (a hash of up to 10,000 rows and the row
    count: equal rows, equal digest), schema and row count; the rows themselves are not uploaded.
    Where they come from is one of: `hub_path` (+ `hub_config`) on the Hugging Face hub, a local
    `file` in the hub's schema, or a `generator` function (data made in code).
    """

    name: str  # the dataset's name in MLflow, e.g. 'arc_easy/validation'
    context: str  # what the run does with it: 'train', 'validation', 'test' or 'ood'
    rows: Any  # the split's rows, a datasets.Dataset
    hub_split: str  # the rows of the hub split, in `datasets` slicing syntax: 'validation[:408]'
    hub_path: str | None = None  # hub dataset id, e.g. 'allenai/ai2_arc'
    hub_config: str | None = None  # hub config name, e.g. 'ARC-Easy'
    file: str | None = None  # the local file the hub split was read from
    generator: str | None = (
        None  # the function that made the rows, e.g. 'melora.tasks.demo.shifted'
    )


def log_dataset_inputs(uri: str, run_id: str, splits: list[SplitInput]) -> None:
    """Log `splits` as the run's dataset inputs (MLflow's Dataset column and the run page's
    Datasets), each with its role as the input tag `mlflow.data.context`.

    The source is a `HuggingFaceDatasetSource` (the hub id, config and rows of the split: the UI
    links to the hub), a `LocalArtifactDatasetSource` (the file) or a `CodeDatasetSource` (the
    generator, and the hub split it made). Logging the same inputs again adds nothing.
    """
    import mlflow.data  # pandas and friends: only where datasets are logged
    from mlflow.data.sources import (  # with mlflow.data
        CodeDatasetSource,
        HuggingFaceDatasetSource,
        LocalArtifactDatasetSource,
    )

    inputs = []
    for split in splits:
        if split.context not in DATASET_CONTEXTS:
            raise ValueError(
                f"dataset input {split.name!r}: context {split.context!r} is not one of {list(DATASET_CONTEXTS)}"
            )
        if split.generator is not None:
            source = CodeDatasetSource(
                tags={"generator": split.generator, "split": split.hub_split}
            )
        elif split.file is not None:
            source = LocalArtifactDatasetSource(split.file)
        else:
            source = HuggingFaceDatasetSource(
                path=split.hub_path, config_name=split.hub_config, split=split.hub_split
            )
        with warnings.catch_warnings():  # MLflow's schema hints, pandas' deprecations in it
            warnings.simplefilter("ignore")
            info = mlflow.data.from_huggingface(
                split.rows, name=split.name, source=source
            ).to_dict()
        dataset = Dataset(
            name=info["name"],
            digest=info["digest"],
            source_type=info["source_type"],
            source=redact_text(info["source"]),
            schema=info.get("schema"),
            profile=info.get("profile"),
        )
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, split.context)]))
    for attempt in range(DATASET_INSERT_TRIES if inputs else 0):
        try:
            store.client(uri).log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            # Two runs of one experiment logging the same new dataset at once (a sweep's trials
            # starting together): MLflow's SQL store checks, then inserts, so one insert fails on
            # the datasets' unique key and its transaction is rolled back. The dataset exists
            # now: logging again links it to this run.
            if not _DUPLICATE_KEY.search(str(err)) or attempt == DATASET_INSERT_TRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def logged_dataset_inputs(uri: str, run_id: str) -> list[tuple[str, str, str]]:
    """(name, context, digest) of each dataset input of a run, as MLflow has them."""
    run = store.client(uri).get_run(run_id)
    return [
        (
            d.dataset.name,
            next((t.value for t in d.tags if t.key == MLFLOW_DATASET_CONTEXT), ""),
            d.dataset.digest,
        )
        for d in (run.inputs.dataset_inputs if run.inputs else [])
    ]
