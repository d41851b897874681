"""RunManager with a run store: retention (--keep-runs) and release of ended runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from services.trainer.runs import RunManager
from services.trainer.store import SqliteRunStore
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.serving import modelrepo


async def test_keep_runs_deletes_the_oldest_ended_runs_with_their_models_and_state(tmp_path: Path) -> None:
    released: list[str] = []
    runs = RunManager(tmp_path / "models", checkpoint_every_s=0, store=SqliteRunStore(tmp_path / "r.sqlite3"),
                      state_dir=tmp_path / "state", keep_runs=2, release_after_s=0.0, store_flush_every_s=0.05)
    runs.release_listeners.append(released.append)
    try:
        ids = []
        for _ in range(4):
            run = runs.start_run("spiral", {"max_steps": 10})
            ids.append(run.run_id)
            await asyncio.to_thread(run.loop.join, 30)
            time.sleep(0.01)  # distinct created_at
        assert runs.flush_checkpoints(30)
        assert all(modelrepo.list_versions(tmp_path / "models", f"run-{i}") for i in ids)
        deadline = time.monotonic() + 20
        while runs.list_runs():  # stored, then released from memory
            assert time.monotonic() < deadline
            runs.release_ended()
            await asyncio.sleep(0.05)
        assert sorted(released) == sorted(ids)
        assert sorted(await runs.prune()) == sorted(ids[:2])
        assert [r.run_id for r in runs.query_runs(order_by="created_at").runs] == ids[2:]
        for gone in ids[:2]:
            assert not (tmp_path / "models" / f"run-{gone}").exists()
            assert not (tmp_path / "state" / f"{gone}.pt").exists()
        for kept in ids[2:]:
            assert (tmp_path / "state" / f"{kept}.pt").exists()
            assert runs.find_run(kept).state == cpb.RUN_STATE_COMPLETED
    finally:
        await runs.aclose()


async def test_an_ended_run_stays_until_the_publisher_sent_its_final_state(tmp_path: Path) -> None:
    # The race a loaded machine hit (bench_run_store, cycle 170 of 600): a run
    # released before the publisher's next tick never had COMPLETED published, and
    # the streamers showed it RUNNING for good.
    from services.trainer.publisher import Publisher
    from tensorwire.calls.publishing import Link

    runs = RunManager(tmp_path / "models", checkpoint_every_s=0, store=SqliteRunStore(tmp_path / "r.sqlite3"),
                      state_dir=tmp_path / "state", release_after_s=0.0, store_flush_every_s=0.05)
    publisher = Publisher(runs, "127.0.0.1:1")  # not started: it collects when this test says
    runs.release_listeners.append(publisher.forget)
    runs.release_checks.append(publisher.final_sent)
    link = publisher.streams.links["streamer:1"] = Link("streamer:1")
    try:
        run = runs.start_run("spiral", {"max_steps": 10})
        await asyncio.to_thread(run.loop.join, 30)
        assert runs.flush_checkpoints(30)  # its last checkpoint written (and noted in its record)
        deadline = time.monotonic() + 20
        while not runs.recorder or not runs.recorder.persisted(run.run_id, cpb.RUN_STATE_COMPLETED):
            assert time.monotonic() < deadline
            runs.records()  # as the recorder's source: the run's end is noted
            await asyncio.sleep(0.05)
        later = time.time() + 60
        assert runs.recorder.persisted(run.run_id, cpb.RUN_STATE_COMPLETED)
        assert runs.release_ended(later) == []  # stored, but COMPLETED not published yet
        publisher.collect()  # the final status and points go to the link's outbox
        assert run.run_id in link.pending_status
        assert runs.release_ended(later) == []  # queued, not yet handed to the stream
        sent = link.drain()
        assert sent
        assert runs.release_ended(later) == []  # drained, but the write may still fail
        link.writing_status.clear()  # what the stream does once every write went out
        assert runs.release_ended(later) == [run.run_id]
        assert run.run_id not in link.statuses  # forgotten once released
    finally:
        await runs.aclose()


async def test_an_unreachable_streamer_does_not_keep_ended_runs_for_ever(tmp_path: Path) -> None:
    from services.trainer.publisher import FINAL_SEND_WAIT_S, Publisher
    from tensorwire.calls.publishing import Link

    runs = RunManager(tmp_path / "models", checkpoint_every_s=0, store=SqliteRunStore(tmp_path / "r.sqlite3"),
                      state_dir=tmp_path / "state", release_after_s=0.0, store_flush_every_s=0.05)
    publisher = Publisher(runs, "127.0.0.1:1")
    runs.release_listeners.append(publisher.forget)
    runs.release_checks.append(publisher.final_sent)
    link = publisher.streams.links["streamer:1"] = Link("streamer:1")  # never connects
    try:
        run = runs.start_run("spiral", {"max_steps": 10})
        await asyncio.to_thread(run.loop.join, 30)
        assert runs.flush_checkpoints(30)
        deadline = time.monotonic() + 20
        while not runs.recorder or not runs.recorder.persisted(run.run_id, cpb.RUN_STATE_COMPLETED):
            assert time.monotonic() < deadline
            runs.records()
            await asyncio.sleep(0.05)
        publisher.collect()
        assert link.owes_status(run.run_id)
        assert runs.release_ended(time.time() + 60) == []  # a disconnected link is waited for a while
        link.connected = True
        run.ended_at -= FINAL_SEND_WAIT_S + 1
        assert runs.release_ended(time.time() + 60) == []  # ... a connected one always
        link.connected = False
        assert runs.release_ended(time.time() + 60) == [run.run_id]  # then memory wins
    finally:
        await runs.aclose()
