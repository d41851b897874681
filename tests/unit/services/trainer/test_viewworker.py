"""The view worker process renders the same view as the trainer's own thread would,
and each view shows its own snapshot."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from services.trainer.tasks import TASKS
from services.trainer.viewworker import LocalRenderer, ViewWorker
from tensorwire.common.v1 import common_pb2 as cpb


async def test_worker_process_renders_the_snapshot() -> None:
    task = TASKS["spiral"]
    config = task.configure()
    torch.manual_seed(0)
    model = task.build_model(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = task.build_view(model, task.make_data(config, 5), config)
    worker = ViewWorker()
    try:
        data, cost_s = await worker.render("run-1", "spiral", config, 5, state, 42, 123.5)
    finally:
        worker.close()
    view = cpb.View.FromString(data)
    assert view.step == 42 and view.produced_at == 123.5 and cost_s >= 0
    assert [a.SerializeToString() for a in view.arrays] == [a.SerializeToString() for a in expected.arrays]


def test_each_view_shows_its_own_snapshot() -> None:
    """The renderer's model keeps its state tensors listed once; every snapshot is
    still copied into them, so successive views show successive weights."""
    task = TASKS["spiral"]
    config = task.configure()
    data = task.make_data(config, 5)
    renderer = LocalRenderer()
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        model = task.build_model(config).eval()
        with torch.no_grad():
            expected = task.build_view(model, data, config)
        snap = SimpleNamespace(config=config, state_dict={k: v.clone() for k, v in model.state_dict().items()},
                               step=seed, produced_at=1.0)
        view, _ = renderer.render("run-1", task, data, snap)
        assert [a.SerializeToString() for a in view.arrays] == [a.SerializeToString() for a in expected.arrays]


async def test_worker_survives_a_failing_view_and_restarts_after_dying() -> None:
    """A view that raises fails only that render; a worker that dies fails the renders
    it held, and the next render starts a new one."""
    import os
    import signal

    import pytest

    from services.trainer.viewworker import ViewWorkerDied

    task = TASKS["spiral"]
    config = task.configure()
    state = {k: v.clone() for k, v in task.build_model(config).state_dict().items()}
    worker = ViewWorker()
    try:
        with pytest.raises(RuntimeError, match="KeyError"):
            await worker.render("run-1", "no-such-task", config, 5, state, 1, 1.0)
        data, _ = await worker.render("run-1", "spiral", config, 5, state, 2, 1.0)
        assert cpb.View.FromString(data).step == 2
        first = worker._process
        assert first is not None and first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(ViewWorkerDied):
            await worker.render("run-1", "spiral", config, 5, state, 3, 1.0)
        data, _ = await worker.render("run-1", "spiral", config, 5, state, 4, 1.0)
        assert cpb.View.FromString(data).step == 4 and worker._process is not first
    finally:
        worker.close()
