"""The view worker process renders the same view as the trainer's own thread would,
and each view shows its own snapshot."""

from __future__ import annotations

from pathlib import Path
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


async def test_renders_at_once_share_one_worker_and_close_fails_the_pending() -> None:
    """Renders that arrive while the worker starts share that one process; closing
    the worker fails a render still waiting, and later renders, with ViewWorkerDied."""
    import asyncio
    import multiprocessing

    import pytest

    from services.trainer.viewworker import ViewWorkerDied

    task = TASKS["spiral"]
    config = task.configure()
    state = {k: v.clone() for k, v in task.build_model(config).state_dict().items()}
    worker = ViewWorker()
    try:
        results = await asyncio.gather(*(worker.render(f"run-{i}", "spiral", config, 5, state, i, 1.0)
                                         for i in range(3)))
        assert [cpb.View.FromString(data).step for data, _ in results] == [0, 1, 2]
        assert [p.name for p in multiprocessing.active_children()].count("tensorwire-views") == 1
        pending = asyncio.ensure_future(worker.render("run-0", "spiral", config, 5, state, 9, 1.0))
        await asyncio.sleep(0)
    finally:
        worker.close()
    with pytest.raises(ViewWorkerDied):
        await pending
    with pytest.raises(ViewWorkerDied, match="closed"):
        await worker.render("run-0", "spiral", config, 5, state, 10, 1.0)


def test_auto_renders_in_a_process_with_two_cpus_or_more(monkeypatch: object, tmp_path: Path) -> None:
    """``--view-renderer auto``: a worker process when the trainer may use 2 CPUs or
    more (its affinity, capped by the lowest cgroup quota on its way to the root), a
    thread when pinned to one or held to less than 2 CPUs."""
    import pytest

    from services.trainer import viewworker
    from services.trainer.settings import TrainerSettings
    from tensorwire.rpc.config import SettingsError, load

    mp = monkeypatch
    assert isinstance(mp, pytest.MonkeyPatch)
    assert viewworker.view_process("process", 1) and not viewworker.view_process("thread", 8)
    assert viewworker.view_process("auto", 2) and not viewworker.view_process("auto", 1.5)
    empty = tmp_path / "none"
    empty.mkdir()
    for cpus, expected in (({0, 1}, 2.0), ({0}, 1.0)):
        mp.setattr(viewworker.os, "sched_getaffinity", lambda _pid, cpus=cpus: cpus)
        assert viewworker.usable_cpus(empty) == expected
    mp.setattr(viewworker.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "pod" / "ctr").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "kubepods" / "pod" / "cpu.max").write_text("150000 100000\n")  # a parent's limit counts
    (v2 / "kubepods" / "pod" / "ctr" / "cpu.max").write_text("max 100000\n")
    assert viewworker._cgroup_quota(v2, "kubepods/pod/ctr") == 1.5
    assert viewworker._cgroup_quota(v2, "kubepods") is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert viewworker._cgroup_quota(v1, "") == 2.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert viewworker._cgroup_quota(v1, "") is None
    assert load(TrainerSettings, [], env={}).view_renderer == "auto"
    with pytest.raises(SettingsError, match="view_renderer|view-renderer"):
        load(TrainerSettings, ["--view-renderer", "gpu"], env={})


async def test_a_hung_worker_is_replaced(monkeypatch: object) -> None:
    """A worker that does not answer within RENDER_TIMEOUT_S fails that render and is
    killed; the next render starts a new one."""
    import os
    import signal

    import pytest

    from services.trainer import viewworker
    from services.trainer.viewworker import ViewWorkerDied

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    task = TASKS["spiral"]
    config = task.configure()
    state = {k: v.clone() for k, v in task.build_model(config).state_dict().items()}
    worker = ViewWorker()
    try:
        await worker.warm_up()  # its start (imports) within the default timeout
        monkeypatch.setattr(viewworker, "RENDER_TIMEOUT_S", 1.0)
        hung = worker._process
        assert hung is not None and hung.pid is not None
        os.kill(hung.pid, signal.SIGSTOP)
        with pytest.raises(ViewWorkerDied, match="did not answer"):
            await worker.render("run-1", "spiral", config, 5, state, 1, 1.0)
        hung.join(5)
        assert not hung.is_alive()
        monkeypatch.setattr(viewworker, "RENDER_TIMEOUT_S", 60.0)  # a new worker's start takes seconds
        data, _ = await worker.render("run-1", "spiral", config, 5, state, 2, 1.0)
        assert cpb.View.FromString(data).step == 2 and worker._process is not hung
    finally:
        worker.close()
