"""MLflow's system metrics (CPU, memory, GPU) of the machine that trains, sampled into its run by
a daemon thread that an MLflow outage does not stop: `start_system_metrics`."""

from __future__ import annotations

import sys
import threading

from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

from orchestrator.redaction import redact_text
from orchestrator.tracking import store
from orchestrator.tracking.log import log_metrics
from orchestrator.tracking.retries import is_transient

SYSTEM_METRICS_STOP_WAIT_S = 5.0  # how long stopping the system metrics waits for their thread


class SystemMetrics:
    """MLflow's system metrics of this machine, logged to one run by a daemon thread.

        monitor = start_system_metrics(uri, run_id)   # None when turned off
        ...                                           # train
        monitor.stop()

    The metrics are MLflow's own (its `SystemMetricsMonitor`'s samplers and names):
    `system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes` and `_percentage`,
    disk and network, and per NVIDIA GPU `system/gpu_<i>_utilization_percentage`,
    `_memory_usage_megabytes`, `_memory_usage_percentage` and `_power_usage_watts` (with
    nvidia-ml-py and an NVIDIA driver; AMD GPUs through pyrsmi). MLflow's variables apply:
    `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` (seconds, default 10; it wins over
    `sampling_interval_s`), `MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING` (default 1: one point
    per interval) and `MLFLOW_SYSTEM_METRICS_NODE_ID` (names become `system/<node>/...`).

    Unlike `mlflow.start_run(log_system_metrics=True)`, it works for a run made by `MlflowClient`,
    and an MLflow outage costs points, never the run: a point that MLflow does not take is
    dropped (they are samples, not a record; the training metrics are the ones spooled) and
    sampling goes on; a refusal (a deleted run) ends the thread, its error kept in `last_error`.
    `stop()` logs the last, partial interval (so a run shorter than the interval has a point
    too) and waits at most `wait_s` for the thread, a daemon that a killed process takes along.
    Steps go on from the run's last one, so a resumed run's points follow its earlier ones.
    """

    def __init__(self, uri: str, run_id: str, sampling_interval_s: float = 10.0) -> None:
        # psutil and the GPU samplers: imported only where system metrics are sampled
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.uri, self.run_id = uri, run_id
        # MLflow's monitor gives the samplers and its settings; its own thread is not used: it
        # stops for good at the first failed MLflow call, and `finish` waits for MLflow unbounded
        self._sampler = SystemMetricsMonitor(
            run_id, sampling_interval=sampling_interval_s, tracking_uri=uri
        )
        self.interval_s = float(self._sampler.sampling_interval)
        self.samples_per_point = max(1, int(self._sampler.samples_before_logging))
        node = self._sampler.node_id
        self.prefix = f"system/{node}/" if node else "system/"
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SystemMetrics:
        """Start sampling (once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="melora-system-metrics", daemon=True
            )
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, wait_s: float = SYSTEM_METRICS_STOP_WAIT_S) -> bool:
        """Log the last interval and stop; True when the thread ended within `wait_s` seconds
        (else it ends by itself once its MLflow call returns, logging nothing more)."""
        if self._thread is None:
            return True
        self._stop.set()
        self._thread.join(wait_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        # a first sample sets the baselines, dropped: psutil measures CPU use between two calls
        # of the same thread
        self._sampler.collect_metrics()
        self._clear()
        step, samples = self._next_step(), 0
        while True:
            stopping = self._stop.wait(self.interval_s)
            self._sampler.collect_metrics()
            samples += 1
            if stopping or samples >= self.samples_per_point:
                values = {self.prefix + k: v for k, v in self._sampler.aggregate_metrics().items()}
                self._clear()
                samples = 0
                try:
                    log_metrics(self.uri, self.run_id, values, step)
                except Exception as err:  # the point is dropped
                    self.last_error = err
                    if not is_transient(err):
                        return
                step += 1
            if stopping:
                return

    def _next_step(self) -> int:
        """The step after the run's last system metrics point: 0 for a new run, or when MLflow
        does not answer."""
        try:
            history = store.client(self.uri).get_metric_history(
                self.run_id, self.prefix + "cpu_utilization_percentage"
            )
        except Exception:
            return 0
        return max((m.step for m in history), default=-1) + 1

    def _clear(self) -> None:
        for sampler in self._sampler.monitors:
            sampler.clear_metrics()


def start_system_metrics(uri: str, run_id: str) -> SystemMetrics | None:
    """`SystemMetrics` of run `run_id`, started; None when `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`
    is set to false (MLflow's switch; unset, training runs log them), or, with a warning on
    stderr, when they cannot be sampled here (say a bad MLFLOW_SYSTEM_METRICS_* value): a run
    never fails for its system metrics."""
    try:
        if (
            MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set()
            and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get()
        ):
            return None
        return SystemMetrics(uri, run_id).start()
    except Exception as err:
        print(
            f"[tracking] warning: no system metrics for MLflow run {run_id}: "
            f"{type(err).__name__}: {redact_text(str(err))}",
            file=sys.stderr,
            flush=True,
        )
        return None
