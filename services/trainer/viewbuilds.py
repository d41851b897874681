"""Which watched runs get a view built now, and building them.

A view is built only for a run someone watches, paced by
:class:`tensorwire.calls.publishing.ViewPacer` (``max_fps``, the viewers' own cap, a CPU
budget), from a weight snapshot, in a worker process (viewworker.py) or, without
one, in a thread of this process; it is serialized once for every streamer link.
A terminal or paused run's weights do not change: it gets one view, then no more
until its state changes or someone new watches.
"""

from __future__ import annotations

import asyncio
import logging
import math

from tensorwire.calls.publishing import StreamLinks, ViewPacer
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.streamer.v1 import streamer_pb2 as spb

from .loop import TERMINAL
from .runs import Run
from .viewworker import LocalRenderer, ViewWorker

log = logging.getLogger(__name__)


class ViewBuilds:
    """Builds views of the runs that ``streams`` says are watched."""

    def __init__(self, streams: StreamLinks, *, max_fps: float = 20.0, cpu_budget: float = 0.02,
                 worker: ViewWorker | None = None) -> None:
        self.streams = streams
        self.pacer = ViewPacer(max_fps, cpu_budget)
        self.worker = worker
        self.local = LocalRenderer()
        self.built = 0
        self._building: dict[str, asyncio.Task[None]] = {}
        self.ready = asyncio.Event()
        """Set once views can be built (the view worker process has started)."""

    async def warm_up(self) -> None:
        if self.worker is not None:
            try:
                await self.worker.warm_up()
            except Exception:
                log.exception("view worker does not start; views will fail")
        self.ready.set()

    async def aclose(self) -> None:
        tasks = list(self._building.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.worker is not None:
            self.worker.close()

    def maybe_build(self, run: Run, now: float, state: int) -> None:
        """Start a build of ``run``'s view if it is watched and due."""
        run_id = run.run_id
        if not self.streams.watchers(run_id) or run_id in self._building or not self.pacer.due(run_id, now):
            return
        # (Starting views half a tick early, to undo the rounding up to the next tick,
        # was tried: after a streamer restart the first live view then came late in
        # 2-5 of 8 runs of test_streamer_restart_publisher_reconnects, against 0 of 6.)
        still = state in TERMINAL or state == cpb.RUN_STATE_PAUSED
        # the viewers' demand and the task's own cap (0 / None: none)
        caps = [fps for fps in (self.streams.demand_fps(run_id), run.max_view_fps)
                if fps and math.isfinite(fps) and fps > 0]
        self.pacer.started(run_id, now, min(caps, default=0.0), last=still)
        task = asyncio.create_task(self._build(run), name=f"view-{run_id}")
        self._building[run_id] = task
        task.add_done_callback(lambda _: self._building.pop(run_id, None))

    def wake(self, run_id: str) -> None:
        """Someone new watches, or the run's state changed: build a view at the next tick."""
        self.pacer.wake(run_id)

    def forget(self, run_id: str) -> None:
        self.pacer.forget(run_id)
        self.local.forget(run_id)

    async def _build(self, run: Run) -> None:
        try:
            snap = await asyncio.wrap_future(run.request_snapshot())
            if self.worker is not None:
                data, cost = await self.worker.render(
                    run.run_id, run.task_name, snap.config, run.seed, snap.state_dict,
                    snap.step, snap.produced_at,
                )
                view = cpb.View.FromString(data)
            else:
                task, live_data = run.view_inputs()
                view, cost = await asyncio.to_thread(self.local.render, run.run_id, task, live_data, snap)
            self.pacer.cost(run.run_id, cost)
        except Exception:
            log.exception("view of run %s failed", run.run_id)
            return
        self.built += 1
        data = spb.PublishRequest(
            run_id=run.run_id, step=snap.step, produced_at=snap.produced_at, view=view
        ).SerializeToString()
        self.streams.publish_view((run.run_id, view.name or view.kind), data)
