"""tensorwire.track: with torch.distributed initialised, only rank 0 publishes (init on
another rank returns a run whose calls do nothing; two real gloo processes); watched
gradients are copied in the backward pass."""

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


def test_watched_gradients_are_copied_in_the_backward_pass_not_read_by_the_view() -> None:
    """The watch view reads gradient copies made by hooks on the thread that runs
    backward (reading p.grad from the view's thread raced the autograd engine and
    crashed the process): one copy per parameter after each view, none in between."""
    import threading

    import torch

    from tensorwire.track import _WatchedGrads

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    watched = _WatchedGrads(model)
    assert watched.take() == [None] * 4  # nothing before the first backward

    def step(scale: float) -> None:
        model.zero_grad()
        (model(torch.ones(5, 3)) * scale).sum().backward()

    trainer = threading.Thread(target=step, args=(1.0,))  # backward on its own thread, as a script's
    trainer.start()
    trainer.join()
    first = watched.take()
    for (_, p), copy in zip(watched.params, first):
        assert copy is not None and copy is not p.grad and torch.equal(copy, p.grad)
    step(2.0)
    second = watched.take()  # the next backward copied anew
    for (_, p), copy, earlier in zip(watched.params, second, first):
        assert torch.equal(copy, p.grad) and torch.allclose(copy, earlier * 2)
    step(3.0)
    step(5.0)  # no view in between: only the first of these two was copied
    for (_, p), copy in zip(watched.params, watched.take()):
        assert torch.allclose(copy * 5, p.grad * 3)
    watched.remove()
    step(7.0)
    for (_, p), copy in zip(watched.params, watched.take()):
        assert not torch.equal(copy, p.grad)  # no hooks left on the model
