"""ViewPacer: the one rule for how often the trainer's publisher and the SDK build a view."""

from __future__ import annotations

import pytest

from tensorwire.calls.publishing import ViewPacer


def test_rate_is_the_lower_of_max_fps_and_the_viewers_cap() -> None:
    pacer = ViewPacer(max_fps=10.0, cpu_budget=0.02)
    assert pacer.interval_s("r", demand_fps=0.0) == pytest.approx(0.1)  # nobody asked: max_fps
    assert pacer.interval_s("r", demand_fps=2.0) == pytest.approx(0.5)
    assert pacer.interval_s("r", demand_fps=30.0) == pytest.approx(0.1)  # never above max_fps


def test_cpu_budget_stretches_the_interval_by_the_smoothed_cost() -> None:
    pacer = ViewPacer(max_fps=10.0, cpu_budget=0.02)
    pacer.cost("r", 0.003)  # 3 ms at a 2 % budget: at least 150 ms apart
    assert pacer.interval_s("r", 0.0) == pytest.approx(0.15)
    pacer.cost("r", 0.013)  # 0.9 * 3 ms + 0.1 * 13 ms = 4 ms
    assert pacer.interval_s("r", 0.0) == pytest.approx(0.2)
    assert pacer.interval_s("other", 0.0) == pytest.approx(0.1)  # per key


def test_due_after_the_interval_and_a_last_view_waits_for_wake() -> None:
    pacer = ViewPacer(max_fps=4.0, cpu_budget=0.02)
    assert pacer.due("r", 100.0)
    pacer.started("r", 100.0, 0.0)
    assert not pacer.due("r", 100.2) and pacer.due("r", 100.25)
    pacer.started("r", 101.0, 0.0, last=True)  # a paused or ended run: one view, then none
    assert not pacer.due("r", 1e9)
    pacer.wake("r")
    assert pacer.due("r", 101.0)
    pacer.started("a", 0.0, 0.0)
    pacer.started("b", 0.0, 0.0, last=True)
    pacer.wake_all()
    assert pacer.due("a", 0.0) and pacer.due("b", 0.0)
    pacer.cost("a", 1.0)
    pacer.forget("a")
    assert pacer.interval_s("a", 0.0) == pytest.approx(0.25)
