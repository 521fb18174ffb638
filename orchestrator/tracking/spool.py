"""Rank 0's metrics through an MLflow outage: `MetricSpool` writes each record to disk before
sending it and keeps what it cannot send for later, so that a down server costs no metric point and
blocks no training step; `flush_pending` sends a spool left behind by a run that ended while the
server was down.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from orchestrator import state_files
from orchestrator.errors import TrackingError
from orchestrator.redaction import redact_text, redact_uri
from orchestrator.tracking import store
from orchestrator.tracking.log import METRICS_PER_BATCH
from orchestrator.tracking.retries import CALL_TIMEOUT_S, is_transient, short_calls

PENDING_FILE = "mlflow_pending.jsonl"
SENT_FILE = "mlflow_sent.json"
BACKOFF_S = (1.0, 30.0)  # a failing spool tries again after 1 s, doubling up to 30 s


class MetricSpool:
    """Rank 0's metrics, on disk first and then in MLflow: an outage loses no point and blocks no step.

    `folder` is the Ray Train run's folder (beside its checkpoints and melora_run.json), where a
    restarted worker finds it, on any node of a shared storage:
      mlflow_pending.jsonl  append-only, one line per `add`: {"seq": n, "step": s, "timestamp": ms,
                            "metrics": {key: value}}; opened, appended and closed each time (on
                            NFS/EFS the close makes the line visible to the other nodes)
      mlflow_sent.json      {"run_id": ..., "sent": n}: MLflow has every record up to seq n;
                            replaced atomically (temp file + rename) after each successful log_batch
    Records are sent in order, each metric with the timestamp and step it was logged with; a new
    spool (a restarted worker, `flush_pending`) first sends the records after `sent`. A record is
    sent twice only when the process dies between MLflow's answer and the rename; that repeat is
    exact (same key, value, timestamp and step), which MLflow's SQL stores ignore (it is their
    metrics' primary key), so each point is in the history once.
    While sending fails with a transient error (`is_transient`), `add` only appends and tries
    again after a back-off (1 s, doubling up to 30 s): a down server costs at most one short call
    (`short_calls`) per back-off. A refusal (for example a deleted run) raises TrackingError.
    `flush(wait_s)` tries until everything is sent or `wait_s` seconds have passed.
    A spool left by another MLflow run id (a new MLflow run under the same run name) is moved
    into the subfolder `mlflow_spool_<its run id>` when it holds unsent records (`flush_pending`
    sends them), else removed. A torn last line (the process died while writing it) is dropped.
    """

    def __init__(
        self, folder: str | os.PathLike, uri: str, run_id: str, timeout_s: int = CALL_TIMEOUT_S
    ) -> None:
        self.folder, self.uri, self.run_id, self.timeout_s = Path(folder), uri, run_id, timeout_s
        self.path, self.marker = self.folder / PENDING_FILE, self.folder / SENT_FILE
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_error: BaseException | None = None
        self._backoff, self._retry_at = BACKOFF_S[0], 0.0
        owner, sent = _read_sent_marker(self.marker)
        records = self._read_records()
        if owner is not None and owner != run_id:
            self._set_aside(owner, any(r["seq"] > sent for r in records))
            owner, sent, records = None, 0, []
        self.sent = sent
        self.pending = [r for r in records if r["seq"] > sent]
        self.next_seq = max([sent, *(r["seq"] for r in records)]) + 1
        if owner is None:
            self._write_marker(sent)

    def add(self, metrics: Mapping[str, Any], step: int) -> bool:
        """Write one record (every name checked first: a bad name is a ValueError and nothing is
        written), then try to send what is pending; True when MLflow has everything."""
        values = {store.check_name(k): float(v) for k, v in metrics.items()}
        if values:
            record = {
                "seq": self.next_seq,
                "step": int(step),
                "timestamp": int(time.time() * 1000),
                "metrics": values,
            }
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.next_seq += 1
            self.pending.append(record)
        return self.send()

    def send(self, now: bool = False) -> bool:
        """Send the pending records in order, unless a back-off is running (`now` ignores it);
        True when MLflow has everything."""
        if not self.pending:
            return True
        if not now and time.monotonic() < self._retry_at:
            return False
        client = store.client(self.uri)
        try:
            while self.pending:
                batch, size = [], 0
                for record in self.pending:
                    if batch and size + len(record["metrics"]) > METRICS_PER_BATCH:
                        break
                    batch.append(record)
                    size += len(record["metrics"])
                items = [
                    Metric(key, value, r["timestamp"], r["step"])
                    for r in batch
                    for key, value in r["metrics"].items()
                ]
                with short_calls(self.timeout_s):
                    for i in range(0, len(items), METRICS_PER_BATCH):
                        client.log_batch(self.run_id, metrics=items[i : i + METRICS_PER_BATCH])
                self._write_marker(batch[-1]["seq"])
                del self.pending[: len(batch)]
        except Exception as err:
            if not is_transient(err):
                raise TrackingError(
                    f"MLflow at {redact_uri(self.uri)} refused the metrics of run {self.run_id}: "
                    f"{redact_text(str(err))}. {self.unsent_message()}"
                ) from err
            self.last_error = err
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, BACKOFF_S[1])
            return False
        self.last_error, self._backoff, self._retry_at = None, BACKOFF_S[0], 0.0
        return True

    def flush(self, wait_s: float) -> bool:
        """Try to send everything, every second, for up to `wait_s` seconds (plus one call's
        timeout); True when MLflow has everything."""
        deadline = time.monotonic() + wait_s
        while not self.send(now=True):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(1.0, left))
        return True

    def unsent_message(self) -> str:
        """What is left and how to send it later."""
        return (
            f"{len(self.pending)} metric records of MLflow run {self.run_id} are kept in "
            f"{self.path}; once the server is back, rerun the same command (the run resumes from "
            "its last checkpoint in the same MLflow run and sends them first), or send them "
            'alone: python -c "from orchestrator import tracking; '
            f"tracking.flush_pending('{self.folder}', '<tracking URI>')\""
        )

    def _read_records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:  # no newline at the end: the writer died in the middle of this line
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
        records = []
        for number, line in enumerate(lines[:-1], 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                record = {
                    "seq": int(raw["seq"]),
                    "step": int(raw["step"]),
                    "timestamp": int(raw["timestamp"]),
                    "metrics": {store.check_name(k): float(v) for k, v in raw["metrics"].items()},
                }
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise TrackingError(
                    f"{self.path} line {number} is not a metric record ({err}): the file is "
                    "damaged; move it away to start a new spool (its unsent records are then lost)"
                ) from None
            records.append(record)
        return records

    def _write_marker(self, sent: int) -> None:
        state_files.write_json(self.marker, {"run_id": self.run_id, "sent": sent})
        self.sent = sent

    def _set_aside(self, owner: str, unsent: bool) -> None:
        if not unsent:
            self.path.unlink(missing_ok=True)
            self.marker.unlink(missing_ok=True)
            return
        aside = self.folder / f"mlflow_spool_{owner}"
        aside.mkdir(exist_ok=True)
        for file in (self.path, self.marker):
            if file.exists():
                os.replace(file, aside / file.name)


def _read_sent_marker(marker: Path) -> tuple[str | None, int]:
    """(run id, last sent seq) of a spool's mlflow_sent.json; (None, 0) without one."""
    if not marker.is_file():
        return None, 0
    try:
        data = json.loads(marker.read_text())
        return str(data["run_id"]), int(data["sent"])
    except (ValueError, KeyError, TypeError) as err:
        raise TrackingError(
            f"{marker} is damaged ({err}): delete it to send every record of {marker.parent / PENDING_FILE} "
            "again (MLflow's SQL stores ignore the exact repeats)"
        ) from None


def flush_pending(folder: str | os.PathLike, uri: str, wait_s: float = 0.0) -> int:
    """Send the metrics that a run left in its spool `folder` (the Ray Train run's folder, or an
    `mlflow_spool_<run id>` folder set aside in it) to the MLflow run named in its
    mlflow_sent.json at `uri`; returns how many records were sent. Raises TrackingError when some
    are still unsent after `wait_s` seconds. The run's status is not changed."""
    folder = Path(folder)
    run_id, _ = _read_sent_marker(folder / SENT_FILE)
    if run_id is None:
        raise TrackingError(
            f"{folder / SENT_FILE} not found: {folder} holds no MLflow spool (give the Ray Train "
            "run's folder, <storage_path>/<run name>)"
        )
    spool = MetricSpool(folder, uri, run_id)
    count = len(spool.pending)
    if not spool.flush(wait_s):
        raise TrackingError(
            f"MLflow at {redact_uri(uri)} cannot be reached ({redact_text(str(spool.last_error))}): "
            + spool.unsent_message()
        )
    return count
