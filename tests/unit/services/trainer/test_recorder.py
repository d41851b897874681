"""RunRecorder: batching off the training thread, a failing store, a bounded buffer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from services.trainer.recorder import RunRecorder
from services.trainer.store import RunRecord, SqliteRunStore
from tensorwire.common.v1 import common_pb2 as cpb


def record(run_id: str, state: int = cpb.RUN_STATE_RUNNING, step: int = 0) -> RunRecord:
    return RunRecord(run_id, "spiral", state, {}, {}, 1, time.time(), time.time(), step=step)


def test_batches_state_events_and_points(tmp_path: Path) -> None:
    live = [record("r1")]
    recorder = RunRecorder(SqliteRunStore(tmp_path / "s.sqlite3"), lambda: live, flush_every_s=30)
    recorder.start()
    try:
        for step in range(1, 101):
            recorder.add_scalars("r1", step, {"loss": 1.0 / step, "accuracy": step / 100})
        assert recorder.flush(10)
        assert recorder.store.scalars("r1", 1000)["loss"][-1].step == 100
        live[0] = record("r1", cpb.RUN_STATE_COMPLETED, 100)
        assert recorder.flush(10)
        assert recorder.persisted("r1", cpb.RUN_STATE_COMPLETED)
        (event,) = recorder.store.events("r1")
        assert event.kind == "state" and event.detail == {"from": "RUN_STATE_RUNNING", "to": "RUN_STATE_COMPLETED"}
        assert "healthy" in repr(recorder)
    finally:
        recorder.close()


def test_a_failing_store_buffers_within_bounds_counts_drops_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    path.write_bytes(b"garbage" * 500)
    recorder = RunRecorder(SqliteRunStore(path, timeout_s=0.1), lambda: [record("r1")],
                           flush_every_s=30, max_points=50, retry_max_s=0.05)
    recorder.start()
    try:
        for step in range(1, 81):
            recorder.add_scalars("r1", step, {"loss": float(step)})
        assert not recorder.flush(10)
        assert not recorder.healthy and recorder.failures >= 1 and "not a database" in recorder.last_error
        assert recorder.dropped == 30  # the 30 oldest steps: the buffer holds 50
        assert "failing" in repr(recorder)
        path.unlink()
        deadline = time.monotonic() + 10
        while not recorder.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recorder.healthy
        assert recorder.flush(10)
        steps = [b.step for b in recorder.store.scalars("r1", 1000)["loss"]]
        assert steps == list(range(31, 81))
    finally:
        recorder.close()


def test_a_full_batch_is_written_before_the_period_ends(tmp_path: Path) -> None:
    periods: list[float] = []

    def frozen(wake: threading.Event, timeout_s: float) -> bool:
        """Time stands still for the writer: only a wake-up ends its wait."""
        periods.append(timeout_s)
        return wake.wait()

    recorder = RunRecorder(SqliteRunStore(tmp_path / "s.sqlite3"), lambda: [record("r1")],
                           flush_every_s=30, batch_points=100, wait=frozen)
    recorder.start()
    try:
        for step in range(1, 100):
            recorder.add_scalars("r1", step, {"loss": float(step)})
        assert recorder.store.scalars("r1", 1000) == {}  # 99 steps: waiting for the period
        recorder.add_scalars("r1", 100, {"loss": 100.0})  # the 100th wakes the writer
        deadline = time.monotonic() + 10
        while not recorder.store.scalars("r1", 1000) and time.monotonic() < deadline:
            time.sleep(0.05)  # the writer is a real thread
        # One batch of all 100 (a writer woken by fewer would have written 99 alone).
        assert [b.step for b in recorder.store.scalars("r1", 1000)["loss"]] == list(range(1, 101))
        assert periods and set(periods) == {30}
    finally:
        recorder.close()


def test_retries_of_a_failing_store_back_off_to_the_cap_and_reset_on_success(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    path.write_bytes(b"garbage" * 500)
    periods: list[float] = []
    enough = threading.Event()

    def instant(wake: threading.Event, timeout_s: float) -> bool:
        """Each wait ends at once (its timeout passes); after 6 the store is repaired,
        after 8 time stands still."""
        periods.append(timeout_s)
        if len(periods) == 6:
            path.unlink()
        if len(periods) >= 8:
            enough.set()
            return wake.wait()
        return False

    recorder = RunRecorder(SqliteRunStore(path, timeout_s=0.1), lambda: [record("r1")],
                           flush_every_s=1.0, retry_max_s=5.0, wait=instant)
    recorder.add_scalars("r1", 1, {"loss": 1.0})
    recorder.start()
    try:
        assert enough.wait(10)
        # The period, then 2, 4, 5 (the cap), 5, 5 s after the failures; written at
        # the 6th: back to the period.
        assert periods[:8] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 1.0, 1.0]
        assert recorder.healthy
    finally:
        recorder.close()
