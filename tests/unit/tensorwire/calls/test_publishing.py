"""ViewPacer: the one rule for how often the trainer's publisher and the SDK build a view."""

from __future__ import annotations

import pytest

from tensorwire.calls.publishing import ViewPacer


def test_rate_is_the_lower_of_max_fps_and_the_viewers_cap() -> None:
    pacer = ViewPacer(max_fps=10.0, cpu_budget=0.02)
    assert pacer.interval_s("r", demand_fps=0.0) == pytest.approx(0.1)  # nobody asked: max_fps
    assert pacer.interval_s("r", demand_fps=2.0) == pytest.approx(0.5)
    assert pacer.interval_s("r", demand_fps=30.0) == pytest.approx(0.1)  # never above max_fps


def test_cpu_budget_stretches_the_interval_by_the_typical_cost() -> None:
    pacer = ViewPacer(max_fps=10.0, cpu_budget=0.02)
    pacer.cost("r", 0.003)  # 3 ms at a 2 % budget: at least 150 ms apart
    assert pacer.interval_s("r", 0.0) == pytest.approx(0.15)
    pacer.cost("r", 0.040)  # one slow view (a spike) does not hold the next ones
    assert pacer.interval_s("r", 0.0) == pytest.approx(0.15)
    pacer.cost("r", 0.013)  # a cost that lasts does: lower median of 3, 13, 40 ms
    assert pacer.interval_s("r", 0.0) == pytest.approx(0.65)
    assert pacer.interval_s("other", 0.0) == pytest.approx(0.1)  # per key
    for _ in range(ViewPacer.COSTS_KEPT):
        pacer.cost("r", 0.001)  # only the last few count
    assert pacer.typical_cost_s("r") == pytest.approx(0.001)
    for cost in (0.001, 0.001, 0.010) * 3:  # every third view expensive: the median is 1 ms,
        pacer.cost("r", cost)               # the mean without the largest (6 + 20) / 8 ms
    assert pacer.typical_cost_s("r") == pytest.approx(0.00325)


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
