"""Training metrics to MLflow without ever holding up a training step.

Rank 0 logged every metric batch in the training loop itself, so the loop waited for the store:
against a tracking server that stopped answering, one ``log_metrics`` call took 247 s (MLflow
retries each HTTP request 7 times with back-off, and the call made two requests), and a sqlite
store locked by another writer held a step for up to 20 s per attempt. A GPU job stood still
for the whole outage, a step every four minutes, only for the metric values to be dropped.

``MetricSink`` hands each batch to one background thread that writes them in order and keeps
what it could not write (with the time of the step, not of the write) to try again, so a
transient outage costs no training time and, once the store answers, no metric values.

A worker group restarted from a checkpoint (``train.max_failures``) or a re-run of the same
command redoes the steps since that checkpoint, and had logged them again under the same keys
and steps: the run's curves held two values at each redone step (MLflow cannot delete a value).
Before its first write the sink reads the newest step the run holds for each key (MLflow keeps
the latest value per key by step); a value at a step already logged goes to ``replay/<key>``
instead, so the main curve keeps one value per step, and the restart is tagged on the run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any, NamedTuple

from radjepa.error_text import first_line

log = logging.getLogger(__name__)

__all__ = ["MetricSink"]

_BATCH = 1000  # MLflow's log_batch limit on metrics per call
REPLAY_PREFIX = "replay/"  # the key of a value at a step the run already holds
RESUMES_TAG = "radjepa.resumes"  # how many times the run went on from a checkpoint or over
RESUMED_FROM_TAG = "radjepa.resumed_from_step"  # the step the latest of them started at


_RECORD_WAIT_S = 60.0  # how long close() waits for the resume record when nothing is queued


class _Value(NamedTuple):
    """One metric value as queued (an MLflow ``Metric`` is made of it in the writer thread)."""

    key: str
    value: float
    timestamp: int  # ms, when the step happened
    step: int


class MetricSink:
    """Write ``(metrics, step)`` batches to one MLflow run from a background thread.

    ``log`` never blocks and never raises. A failed write is retried every ``retry_s`` with
    everything that queued up meanwhile; past ``max_pending`` values the oldest are dropped
    (with a warning) so a long outage cannot grow memory without bound. ``close`` waits up to
    its timeout for the queue to drain and says how many values were not recorded.

    ``start_step`` is the step training starts at (a restored checkpoint's, else 0): with it, or
    with values already in the run, this is a resume, recorded as the tags ``radjepa.resumes``
    (a count), ``radjepa.resumed_from_step`` and ``radjepa.resume.<n>`` (when, from which step,
    which steps are redone).
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        *,
        start_step: int = 0,
        retry_s: float = 30.0,
        max_pending: int = 100_000,
    ) -> None:
        self.uri, self.run_id = uri, run_id
        self.retry_s, self.max_pending = retry_s, max_pending
        self._pending: deque[Any] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._in_flight = 0  # values being written (out of _pending meanwhile)
        self._stopped = False
        self._failing = False
        self._dropped = 0
        self._client: Any = None
        self._metric: Any = None  # mlflow.entities.Metric, imported by the writer thread
        self.start_step = start_step
        self._started = datetime.now(UTC)  # the resume's time, not when a slow store took it
        self._logged: dict[str, int] | None = None  # newest step per key before this sink
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)  # when the step happened, whenever it is written
        with self._cond:
            if self._stopped:  # no writer (MLflow could not be imported): counted as lost
                self._dropped += len(metrics)
                return
            self._pending.extend(_Value(k, float(v), now, step) for k, v in metrics.items())
            overflow = len(self._pending) - self.max_pending
            for _ in range(max(overflow, 0)):
                self._pending.popleft()
            if overflow > 0:
                if not self._dropped:
                    log.warning(
                        "MLflow unreachable for a long time: dropping the oldest metric values "
                        "(more than %d queued)",
                        self.max_pending,
                    )
                self._dropped += overflow
            self._cond.notify()

    def close(self, timeout_s: float = 60.0) -> int:
        """Write what is queued (waiting at most ``timeout_s``); the number of values lost."""
        now = time.monotonic()
        deadline = now + timeout_s
        # the run's resume record (``_begin``) alone, when nothing was logged, is waited for
        # less long: a store that stopped answering held a failed attempt's end for minutes
        record_deadline = now + min(timeout_s, _RECORD_WAIT_S)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._pending or self._in_flight or self._logged is None) and not self._stopped:
                values = self._pending or self._in_flight
                left = (deadline if values else record_deadline) - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            lost = len(self._pending) + self._in_flight + self._dropped
            # (a writer that could not import MLflow said so already)
            unchecked = self._logged is None and not (self._stopped and self._metric is None)
        if unchecked:
            log.warning(
                "MLflow run %s: whether this attempt resumed it is not recorded (the store did "
                "not take it by the end of training)",
                self.run_id,
            )
        if lost:
            log.warning(
                "%d metric values of MLflow run %s were not recorded (the store did not take "
                "them by the end of training)",
                lost,
                self.run_id,
            )
        return lost

    def _run(self) -> None:
        # MLflow's import (~1 s) runs here, not in the training loop, where it delayed the
        # first step of every run (a worker imports it while its first batch is on the way)
        try:
            from mlflow.entities import Metric
        except Exception as err:  # noqa: BLE001 - tracking must never kill a training run
            log.warning("MLflow metric logging is off: cannot import MLflow (%s)", err)
            with self._cond:  # close() then reports every value as not recorded
                self._stopped = True
                self._cond.notify_all()
            return
        self._metric = Metric
        while True:
            with self._cond:
                # the first pass runs at once, with whatever is queued (often nothing): it
                # records a resume before any value (a resumed run that diverged before its
                # first log step ended with its resume recorded nowhere)
                while not self._pending and not self._closing and self._logged is not None:
                    self._cond.wait()
                if not self._pending and self._logged is not None:  # closing, all written
                    self._stopped = True
                    self._cond.notify_all()
                    return
                batch = [self._pending.popleft() for _ in range(min(_BATCH, len(self._pending)))]
                self._in_flight = len(batch)
            ok = self._write(batch)
            with self._cond:
                self._in_flight = 0
                if not ok:
                    self._pending.extendleft(reversed(batch))  # retried first, in order
                    if self._closing:  # that was the last try: close() reports the rest
                        self._stopped = True
                    else:  # every retry_s, not at every step that logs (log() notifies);
                        # close() wakes it for a last try
                        retry_at = time.monotonic() + self.retry_s
                        while not self._closing and (left := retry_at - time.monotonic()) > 0:
                            self._cond.wait(left)
                self._cond.notify_all()
                if self._stopped:
                    return

    def _write(self, batch: list[Any]) -> bool:
        from pipelines.tracking import client

        try:
            if self._client is None:
                self._client = client(self.uri)
            if self._logged is None:
                self._logged = self._begin()
            if batch:
                self._client.log_batch(self.run_id, metrics=[self._placed(m) for m in batch])
        except Exception as err:  # noqa: BLE001 - tracking must never kill a training run
            if not self._failing:
                first = first_line(str(err))[:300]
                log.warning(
                    "MLflow metric logging failed (%s: %s); training goes on, the values are "
                    "kept and retried every %.0f s",
                    type(err).__name__,
                    first,
                    self.retry_s,
                )
            self._failing = True
            return False
        if self._failing:
            log.warning("MLflow metric logging works again; the queued values were recorded")
        self._failing = False
        return True

    def _placed(self, value: _Value) -> Any:
        """``value`` as an MLflow Metric, under ``replay/<key>`` when the run already holds a
        value at its step."""
        assert self._logged is not None
        key = value.key
        if value.step <= self._logged.get(key, -1):
            key = REPLAY_PREFIX + key
        return self._metric(key, value.value, value.timestamp, value.step)

    def _begin(self) -> dict[str, int]:
        """The newest step the run holds per key; tags the run when this attempt is a resume.
        Runs once, in the writer thread, as it starts (so never in a step), and again until
        it succeeds, before any value is written."""
        from mlflow.entities import RunTag

        run = self._client.get_run(self.run_id)
        # the latest value of a key is its highest step (then time): a server sends the steps too
        logged = {m.key: int(m.step) for m in run.data.to_proto().metrics}
        done = max((s for k, s in logged.items() if not k.startswith(REPLAY_PREFIX)), default=-1)
        if self.start_step <= 0 and done < 0:
            return logged  # a new run
        try:
            n = int(run.data.tags.get(RESUMES_TAG, "0")) + 1
        except ValueError:
            n = 1
        note = f"at {self._started:%Y-%m-%dT%H:%M:%SZ} from step {self.start_step}"
        if done > self.start_step:
            note += (
                f"; steps {self.start_step + 1}-{done} were logged before and are redone: "
                f"their new values are logged as {REPLAY_PREFIX}<key>"
            )
        tags = {RESUMES_TAG: str(n), RESUMED_FROM_TAG: str(self.start_step)}
        tags[f"radjepa.resume.{n}"] = note
        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        log.info("MLflow run %s resumed (%d) %s", self.run_id, n, note)
        return logged
