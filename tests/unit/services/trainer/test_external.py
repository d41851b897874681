"""ExternalLoop: a script's run as the trainer sees it (injected clock, no network)."""

from __future__ import annotations

import pytest

from services.trainer.external import ExternalLoop
from services.trainer.runs import RunManager
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.errors import InvalidArgumentError, ResourceExhaustedError
from tests.support.clock import FakeClock


def test_lifecycle_control_and_a_script_that_goes_away() -> None:
    runs = RunManager()
    run = runs.register_run("abc", "mine", {"learning_rate": 0.1})
    clock = FakeClock(100.0)
    loop = ExternalLoop(run.config, detach_grace_s=60, clock=clock)
    assert loop.state == cpb.RUN_STATE_PENDING
    first = loop.attach()
    loop.report(cpb.RunStatus(state=cpb.RUN_STATE_RUNNING, step=5, steps_per_second=10.0, metrics={"loss": 1.0}))
    assert loop.state == cpb.RUN_STATE_RUNNING and loop.status.step == 5
    loop.pause()
    assert loop.control()[0] is True and loop.state == cpb.RUN_STATE_PAUSED
    loop.resume()
    second = loop.attach()  # a reconnecting script takes over; the older stream ends
    assert not loop.attached_by(first) and loop.attached_by(second)
    loop.detach(first)  # the old stream's end changes nothing
    assert loop.attached_by(second)
    loop.detach(second)
    clock.now += 59
    assert loop.state == cpb.RUN_STATE_RUNNING
    clock.now += 2
    assert loop.state == cpb.RUN_STATE_FAILED and "disconnected 61 s ago" in loop.error
    loop.attach()  # it came back
    assert loop.state == cpb.RUN_STATE_RUNNING and loop.error == ""
    loop.report(cpb.RunStatus(state=cpb.RUN_STATE_COMPLETED, step=9))
    assert loop.state == cpb.RUN_STATE_COMPLETED and loop.join(0)


def test_stop_then_leave_reads_as_stopped() -> None:
    loop = ExternalLoop(RunManager().register_run("", "t", {}).config)
    token = loop.attach()
    loop.report(cpb.RunStatus(state=cpb.RUN_STATE_RUNNING, step=1))
    loop.stop()
    assert loop.control()[1] is True and not loop.join(0)
    loop.detach(token)
    assert loop.state == cpb.RUN_STATE_STOPPED and loop.join(0)


def test_script_runs_do_not_count_against_the_trainers_own() -> None:
    runs = RunManager(max_active_runs=1, max_external_runs=2)
    runs.register_run("a", "t", {})
    runs.register_run("b", "t", {})
    with pytest.raises(ResourceExhaustedError, match="limit is 2"):
        runs.register_run("c", "t", {})
    with pytest.raises(InvalidArgumentError, match="unknown parameter"):
        runs.update_run("a", {"learning_rate": 0.1})  # "a" registered no such param
    assert [r.run_id for r in runs.list_runs()] == ["a", "b"]
    assert all(r.external for r in runs.list_runs())
