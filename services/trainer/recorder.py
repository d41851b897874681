"""RunRecorder: writes runs, events and scalar points to a RunStore, off the training threads.

Training threads call :meth:`RunRecorder.add_scalars` after each step: one
append under a lock, nothing else. A writer thread wakes every ``flush_every_s``
(or once ``batch_points`` steps wait; reads and state changes flush at once),
asks its ``source`` for the current records of the live runs, and writes in one
batch what changed (run rows), what happened (events) and the points since the
last batch. A failing store (locked, corrupt, unreachable) never reaches
training: the batch stays pending and is retried with backoff (the store re-opens
its connection), the reason is logged once per outage, every failure is counted
(``tensorwire_run_store_errors_total``), and the buffer is bounded — past
``max_points`` buffered steps the oldest are dropped and counted
(``tensorwire_run_store_dropped_points_total``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from tensorwire.calls.backoff import Backoff
from tensorwire.common.v1 import common_pb2 as cpb

from .store import RunEvent, RunRecord, RunStore

log = logging.getLogger(__name__)

STORE_ERRORS = Counter(
    "tensorwire_run_store_errors_total", "Failed writes to the run store (retried).", ["store"]
)
STORE_DROPPED = Counter(
    "tensorwire_run_store_dropped_points_total",
    "Scalar steps dropped because the run store was down and the buffer was full.", ["store"],
)
STORE_UP = Gauge("tensorwire_run_store_up", "1 while the last write to the run store worked.", ["store"])
STORE_BUFFERED = Gauge(
    "tensorwire_run_store_buffered_points", "Scalar steps waiting to be written.", ["store"]
)
STORE_WRITE = Histogram(
    "tensorwire_run_store_write_seconds", "Time to write one batch to the run store.", ["store"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

RecordSource = Callable[[], Sequence[RunRecord]]
"""Returns the current records of the live runs (called on the writer thread)."""


@dataclass(frozen=True)
class _Written:
    state: int
    key: tuple[object, ...]


def _key(rec: RunRecord) -> tuple[object, ...]:
    return (rec.state, rec.step, rec.checkpoint_step, rec.error, sorted(rec.params.items()),
            rec.name, rec.tags, rec.notes, rec.ended_at)


class RunRecorder:
    """Batches and writes a trainer's runs to ``store`` from one thread."""

    def __init__(
        self,
        store: RunStore,
        source: RecordSource = lambda: (),
        *,
        flush_every_s: float = 2.0,
        batch_points: int = 10_000,
        max_points: int = 200_000,
        max_events: int = 10_000,
        retry_max_s: float = 5.0,
        label: str = "runs",
        wait: Callable[[threading.Event, float], bool] = threading.Event.wait,
    ) -> None:
        """
        :param store: where to write.
        :param source: the live runs' current records, polled each flush.
        :param flush_every_s: period of the writer thread. Each batch costs a
            database a fixed part (its statements, its commit) besides its points:
            fewer batches, less CPU taken from training. What a crash can lose is
            retrained anyway (a run resumes from its last checkpoint).
        :param batch_points: buffered steps that wake the writer before its period.
        :param max_points: most buffered steps (all runs) while the store is down.
        :param max_events: most buffered events while the store is down.
        :param retry_max_s: longest wait between retries of a failing store.
        :param label: the ``store`` label of the metrics.
        :param wait: how the writer thread waits for its wake-up event with a timeout
            (``threading.Event.wait``; tests pass one in which time stands still).
        """
        self.store = store
        self.source = source
        self.flush_every_s = flush_every_s
        self.batch_points = batch_points
        self.max_points = max_points
        self.max_events = max_events
        self.retry_max_s = retry_max_s
        # Twice the flush interval after the first failure (at least 0.2 s), doubling
        # to retry_max_s; no jitter: one writer per trainer, nobody to spread out.
        self._backoff = Backoff(initial_s=min(max(flush_every_s, 0.1) * 2, retry_max_s),
                                max_s=retry_max_s, jitter=0.0)
        self._label = label
        self._wait = wait
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._points: deque[tuple[str, int, Mapping[str, float]]] = deque()
        self._events: deque[RunEvent] = deque()
        self._runs: dict[str, RunRecord] = {}
        self._written: dict[str, _Written] = {}
        self._boot_at: float | None = None
        self.interrupted: list[str] = []
        """Runs the boot sweep found live and marked INTERRUPTED."""
        self.healthy = True
        self.last_error = ""
        self.failures = 0
        self.dropped = 0
        self.cpu_s = 0.0
        """CPU seconds the writer thread spent on batches (what the store costs)."""
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="run-recorder", daemon=True)
        for metric in (STORE_ERRORS, STORE_DROPPED):
            metric.labels(label)
        STORE_UP.labels(label).set(1)

    def __repr__(self) -> str:
        with self._lock:
            points, events, runs = len(self._points), len(self._events), len(self._runs)
        state = "healthy" if self.healthy else f"failing ({self.failures}x: {self.last_error})"
        return (f"<RunRecorder {self.store.description}: {state} | pending {runs} runs, "
                f"{events} events, {points} steps | dropped {self.dropped}>")

    # -- producers (any thread) -----------------------------------------
    def start(self, *, mark_interrupted_at: float | None = None) -> None:
        """Start the thread; first (retried until it works) mark runs a previous
        trainer left live as INTERRUPTED."""
        self._boot_at = mark_interrupted_at
        self._thread.start()

    def add_scalars(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """One step's metrics (called by a training thread after each step)."""
        with self._lock:
            if len(self._points) >= self.max_points:
                self._points.popleft()
                self.dropped += 1
                STORE_DROPPED.labels(self._label).inc()
            self._points.append((run_id, step, metrics))
            full = len(self._points) == self.batch_points
        if full:
            self._wake.set()

    def add_event(self, event: RunEvent) -> None:
        with self._lock:
            if len(self._events) >= self.max_events:
                self._events.popleft()
            self._events.append(event)
        self._idle.clear()

    def put_run(self, record: RunRecord) -> None:
        """A run's record to write now (latest wins per run)."""
        with self._lock:
            self._runs[record.run_id] = record
        self._idle.clear()
        self._wake.set()

    def persisted(self, run_id: str, state: int) -> bool:
        """Whether the store holds ``run_id`` in ``state`` with nothing pending."""
        with self._lock:
            if run_id in self._runs or any(p[0] == run_id for p in self._points):
                return False
            written = self._written.get(run_id)
        return written is not None and written.state == state

    def forget(self, run_id: str) -> None:
        """Drop what is pending for ``run_id`` and what was noted about it."""
        with self._lock:
            self._runs.pop(run_id, None)
            self._written.pop(run_id, None)
            self._points = deque(p for p in self._points if p[0] != run_id)
            self._events = deque(e for e in self._events if e.run_id != run_id)

    def delete_run(self, run_id: str) -> bool:
        """Delete ``run_id`` from the store, after nothing of it can be written again
        (blocking: call from a worker thread). Raises RunStoreError."""
        with self._write_lock:
            self.forget(run_id)
            return self.store.delete_run(run_id)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Write everything pending now; False if it could not be (store failing)."""
        self._idle.clear()
        self._wake.set()
        return self._idle.wait(timeout_s) and self.healthy

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is pending (one last try) and stop the thread."""
        self._closed = True
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        self.store.close()

    # -- the thread ------------------------------------------------------
    def _work(self) -> None:
        failures = 0  # in a row: the retries of a failing store back off
        while True:
            self._wait(self._wake, self._backoff.delay_s(failures) if failures else self.flush_every_s)
            self._wake.clear()
            closing = self._closed
            ok = self.write_once()
            failures = 0 if ok else failures + 1
            self._idle.set()  # flush() waiters learn whether it worked
            if closing:
                return

    def write_once(self) -> bool:
        """One batch: boot sweep, run rows, events, points. Whether it worked."""
        started_cpu = time.thread_time()
        try:
            return self._write_once()
        finally:
            self.cpu_s += time.thread_time() - started_cpu

    def _write_once(self) -> bool:
        with self._write_lock:
            try:
                records = list(self.source())
            except Exception:
                log.exception("run recorder: reading the live runs failed")
                records = []
            with self._lock:
                for rec in records:
                    if rec.run_id not in self._runs:
                        written = self._written.get(rec.run_id)
                        if written is None or written.key != _key(rec):
                            self._runs[rec.run_id] = rec
                runs = dict(self._runs)
                events, self._events = list(self._events), deque()
                points, self._points = list(self._points), deque()
            state_events = []
            for rec in runs.values():
                before = self._written.get(rec.run_id)
                if before is not None and before.state != rec.state:
                    state_events.append(RunEvent(rec.run_id, rec.updated_at, "state", rec.step, {
                        "from": cpb.RunState.Name(before.state), "to": cpb.RunState.Name(rec.state),
                        **({"error": rec.error} if rec.error else {}),
                    }))
            rows = [(run_id, name, step, float(value))
                    for run_id, step, metrics in points for name, value in metrics.items()]
            started = time.perf_counter()
            try:
                if self._boot_at is not None:
                    self.interrupted = self.store.mark_interrupted(self._boot_at)
                    if self.interrupted:
                        log.info("runs left live by the previous trainer are INTERRUPTED: %s",
                                 ", ".join(self.interrupted))
                    self._boot_at = None
                self.store.write(list(runs.values()), state_events + events, rows)
            except Exception as exc:
                self.failures += 1
                STORE_ERRORS.labels(self._label).inc()
                STORE_UP.labels(self._label).set(0)
                self._put_back(events, points)
                if self.healthy:  # once per outage
                    log.warning("%s: writes fail, buffering (at most %d steps) and retrying: %s",
                                self.store.description, self.max_points, exc)
                self.healthy = False
                self.last_error = str(exc)
                return False
            STORE_WRITE.labels(self._label).observe(time.perf_counter() - started)
            with self._lock:
                for run_id, rec in runs.items():
                    if self._runs.get(run_id) is rec:
                        del self._runs[run_id]
                    self._written[run_id] = _Written(rec.state, _key(rec))
                STORE_BUFFERED.labels(self._label).set(len(self._points))
            if not self.healthy:
                log.info("%s works again after %d failed writes", self.store.description, self.failures)
                self.healthy = True
                self.last_error = ""
            STORE_UP.labels(self._label).set(1)
            return True

    def _put_back(self, events: list[RunEvent], points: list[tuple[str, int, Mapping[str, float]]]) -> None:
        """What a failed batch took goes back before what came since, within the bounds."""
        with self._lock:
            self._events = deque([*events, *self._events][-self.max_events:])
            merged = deque([*points, *self._points])
            excess = len(merged) - self.max_points
            if excess > 0:
                for _ in range(excess):
                    merged.popleft()
                self.dropped += excess
                STORE_DROPPED.labels(self._label).inc(excess)
            self._points = merged
            STORE_BUFFERED.labels(self._label).set(len(merged))
