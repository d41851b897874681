"""With torch.distributed initialised, only rank 0 publishes: init on another rank returns
a run whose calls do nothing (two real gloo processes)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest


def _rank_main(rank: int, store: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import torch
    import torch.distributed as dist

    import tensorwire

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        run = tensorwire.init(task="ddp", params={"learning_rate": 0.1}, streamer="", trainer="", inference="")
        run.log(1, loss=torch.tensor(1.0))
        run.view("v", lambda: [1.0])
        run.watch(torch.nn.Linear(2, 2))
        waited = run.wait_if_paused()
        run.finish()
        out.put((rank, type(run).__name__, run.id, run.params["learning_rate"], run.should_stop, waited))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_only_rank_zero_publishes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(rank, str(tmp_path / "store"), out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (r0, kind0, id0, lr0, _, _), (r1, kind1, id1, lr1, stop1, waited1) = results
    assert (r0, kind0, r1, kind1) == (0, "Run", 1, "DisabledRun")
    assert len(id0) == 12 and id1 == ""
    assert lr0 == lr1 == 0.1 and stop1 is False and waited1 is False
