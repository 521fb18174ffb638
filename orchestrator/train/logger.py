"""A worker's progress lines and MLflow logging, from rank 0 only: `RankZeroLogger` (metrics
spooled to disk until MLflow takes them, the end of the run FINISHED or FAILED) and `Progress`
(one line per logging interval).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from orchestrator import tracking
from orchestrator.errors import TrackingError


class RankZeroLogger:
    """Progress lines and MLflow logging, from rank 0 only (a no-op elsewhere).

    Metrics go through a `tracking.MetricSpool` in the Ray Train run's folder (`spool_dir`):
    written to disk first and sent when MLflow answers, each with the timestamp and step it was
    logged with, so that a tracking server that goes away costs no point and blocks no step (one
    short call per back-off); a restarted worker sends first what the last one could not.
    The end of the run (`finish`, `fail`) waits up to `tracking.flush_wait_s()` (300 s;
    $MELORA_MLFLOW_FLUSH_WAIT_S) for MLflow to take the rest, the artifacts or the FAILED status;
    when it is still down the worker raises TrackingError (Ray Train may retry it from the last
    checkpoint, under scaling.max_failures), the metrics stay on disk and the error says how to
    send them. Artifacts are not spooled: they are uploaded at the end, retried within that wait,
    and a run resumed from its last checkpoint uploads them again. From its start to `finish` or
    `fail`, MLflow's system metrics of rank 0's node (CPU, memory, its GPUs) go to the run
    (`tracking.SystemMetrics`: here, where the GPUs are, not in the driver).
    """

    def __init__(
        self,
        rank: int,
        tracking_uri: str | None,
        run_id: str | None,
        spool_dir: str | os.PathLike | None = None,
    ) -> None:
        self.rank, self.uri, self.run_id = rank, tracking_uri, run_id
        self.active = rank == 0 and tracking_uri is not None and run_id is not None
        self.spool: tracking.MetricSpool | None = None
        self.system_metrics: tracking.SystemMetrics | None = None
        self._reachable = True
        if self.active:
            if spool_dir is None:
                spool_dir = Path(tempfile.gettempdir()) / "melora_mlflow_spool" / run_id
                self.print(
                    f"the run's storage is not a folder: metrics waiting for MLflow are kept in "
                    f"{spool_dir} on this node only"
                )
            self.spool = tracking.MetricSpool(spool_dir, tracking_uri, run_id)
            if self.spool.pending:
                self.print(
                    f"{len(self.spool.pending)} metric records that an earlier attempt could not "
                    f"send are in {self.spool.path}: sending them"
                )
            self._note(self.spool.send())
            self.system_metrics = tracking.start_system_metrics(tracking_uri, run_id)

    def print(self, line: str) -> None:
        if self.rank == 0:
            print(f"[melora] {line}", flush=True)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        if self.active and values:
            self._note(self.spool.add(values, step))

    def fail(self, reason: str) -> None:
        """End the MLflow run FAILED with `reason`, after sending the metrics so far. When MLflow
        stays unreachable for `tracking.flush_wait_s()`, a TrackingError that carries `reason`."""
        self.print(f"FAILED: {reason}")
        if not self.active:
            return
        wait, deadline = self._end_of_run()
        self.spool.flush(wait)
        try:
            tracking.call_until(
                lambda: tracking.set_terminated(self.uri, self.run_id, "FAILED", reason),
                max(0.0, deadline - time.monotonic()),
            )
        except Exception as err:
            if not tracking.is_transient(err):
                raise
            raise TrackingError(
                f"{reason}; and MLflow at {tracking.redact_uri(self.uri)} could not be reached for "
                f"{wait:g} s to mark run {self.run_id} FAILED ({err}). "
                + self.spool.unsent_message()
            ) from err

    def finish(self, final: dict[str, float], artifacts: Path, step: int) -> None:
        """Log the final metrics and every artifact folder written by `write_final_artifacts`,
        waiting up to `tracking.flush_wait_s()` for MLflow to take them and everything pending."""
        if self.rank != 0:
            return
        shown = {k: v for k, v in final.items() if k.endswith(("acc_n0", "ece_n0", "nll_n0"))}
        self.print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        if not self.active:
            return
        wait, deadline = self._end_of_run()
        self.log_metrics(final, step)
        if not self.spool.flush(wait):
            raise TrackingError(
                f"MLflow at {tracking.redact_uri(self.uri)} could not be reached for {wait:g} s at "
                f"the end of the run ({self.spool.last_error}; ${tracking.FLUSH_WAIT_ENV} sets "
                "the wait): " + self.spool.unsent_message()
            )
        self._note(True)
        for sub in sorted(p.name for p in artifacts.iterdir()):
            try:
                tracking.call_until(
                    lambda sub=sub: tracking.log_artifacts(
                        self.uri, self.run_id, artifacts / sub, sub
                    ),
                    max(0.0, deadline - time.monotonic()),
                    timeout_s=tracking.ARTIFACT_TIMEOUT_S,
                )
            except Exception as err:
                if not tracking.is_transient(err):
                    raise
                raise TrackingError(
                    f"MLflow at {tracking.redact_uri(self.uri)} took no artifact {sub!r} for "
                    f"{wait:g} s at the end of the run ({err}); the metrics are all sent. Rerun "
                    "the same command once it is back: the run resumes from its last checkpoint "
                    "in the same MLflow run and uploads its artifacts"
                ) from err

    def _end_of_run(self) -> tuple[float, float]:
        """The opening of `fail` and `finish`: the system metrics stop; (the wait for MLflow,
        `tracking.flush_wait_s()`, and its deadline on `time.monotonic()`)."""
        if self.system_metrics is not None:
            self.system_metrics.stop()
        wait = tracking.flush_wait_s()
        return wait, time.monotonic() + wait

    def _note(self, sent: bool) -> None:
        """One line when MLflow stops taking metrics, one when it takes them again."""
        if sent == self._reachable:
            return
        self._reachable = sent
        where = tracking.redact_uri(self.uri)
        if sent:
            self.print(f"MLflow at {where} is back: the waiting metrics are sent")
        else:
            self.print(
                f"MLflow at {where} cannot be reached ({self.spool.last_error}): metrics are kept "
                f"in {self.spool.path} and sent when it is back; training goes on"
            )


class Progress:
    """One line per logging interval: step, NLL, KL and the estimated time left."""

    def __init__(self, total: int, start: int, logger: RankZeroLogger) -> None:
        self.total, self.start, self.logger, self.t0 = total, start, logger, time.monotonic()

    def update(self, step: int, values: dict[str, float]) -> None:
        done = step - self.start
        rate = (time.monotonic() - self.t0) / max(done, 1)
        eta = rate * (self.total - step)
        self.logger.print(
            f"step {step}/{self.total}  nll {values['train/nll']:.4f}  kl {values['train/kl']:.2f}  "
            f"lr {values['train/lr']:.2e}  {rate:.2f} s/step  eta {eta:.0f} s"
        )
