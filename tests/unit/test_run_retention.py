"""RunManager with a run store: retention (--keep-runs) and release of ended runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from services.trainer.runs import RunManager
from services.trainer.store import SqliteRunStore
from tensorwire import modelrepo
from tensorwire.common.v1 import common_pb2 as cpb


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
