"""Which watched runs get a view, and when: the viewers' demand and the task's own cap."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from services.trainer.viewbuilds import ViewBuilds
from tensorwire.common.v1 import common_pb2 as cpb


class Watching:
    """What the streamer links report: one viewer on every run, asking for ``fps``."""

    def __init__(self, fps: float) -> None:
        self.fps = fps

    def watchers(self, run_id: str) -> set[str]:
        return {"viewer"}

    def demand_fps(self, run_id: str) -> float:
        return self.fps


@dataclass
class FakeRun:
    run_id: str
    max_view_fps: float | None


@pytest.mark.parametrize(("demand", "cap", "interval"), [
    (0.0, None, 0.1),   # the trainer's max_fps (10)
    (0.0, 4.0, 0.25),   # the task's cap
    (2.0, 4.0, 0.5),    # the viewers asked for fewer still
    (8.0, 4.0, 0.25),   # the viewers asked for more than the task allows
    (0.0, -1.0, 0.1),   # a cap that is no rate is ignored: the trainer's max_fps
    (0.0, float("nan"), 0.1),
])
def test_views_are_paced_by_the_viewers_and_the_task(demand: float, cap: float | None, interval: float) -> None:
    async def main() -> None:
        builds = ViewBuilds(Watching(demand), max_fps=10.0)  # type: ignore[arg-type]
        built: list[str] = []

        async def build(run: Any) -> None:
            built.append(run.run_id)

        builds._build = build  # type: ignore[method-assign]  # the pacing is under test, not the rendering
        run = FakeRun("r1", cap)
        builds.maybe_build(run, 100.0, cpb.RUN_STATE_RUNNING)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert built == ["r1"]
        assert not builds.pacer.due("r1", 100.0 + interval - 1e-6)
        assert builds.pacer.due("r1", 100.0 + interval)

    asyncio.run(main())
