"""Delivery feedback: the window per subscriber and the hub's Ack, on an injected clock."""

from __future__ import annotations

import math

import pytest

from services.streamer.feedback import AckOutcome, DeliveryWindow, FeedbackLimits
from services.streamer.hub import HubLimits, UpdateHub
from tensorwire.errors import InvalidArgumentError, NotFoundError
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tests.support.clock import FakeClock
from tests.unit.services.streamer.test_hub import _covered, _scalars, _status, _view


def _hub(**feedback: float) -> tuple[UpdateHub, FakeClock]:
    clock = FakeClock()
    limits = HubLimits(feedback=FeedbackLimits(**feedback))  # type: ignore[arg-type]
    return UpdateHub(limits, clock=clock, wall=clock), clock


def _send_all(hub: UpdateHub, sub: object) -> list[spb.Frame]:
    """What the servicer does: number each due frame and write it (instantly)."""
    frames = []
    for out in hub.due_frames(sub):  # type: ignore[arg-type]
        data = hub.numbered(sub, out)  # type: ignore[arg-type]
        hub.record_write(sub, len(data), 0.0, out.kind)  # type: ignore[arg-type]
        frames.append(spb.Frame.FromString(data))
    return frames


# -- the window alone ------------------------------------------------------------

BARE = FeedbackLimits(frame_overhead_bytes=0, ack_reply_bytes=0)
"""Message bytes only, so the figures below are easy to follow."""


def test_wire_overheads_count_as_in_flight() -> None:
    w = DeliveryWindow(FeedbackLimits(frame_overhead_bytes=80, ack_reply_bytes=160))
    w.sent(100, "status", 0.0, now=0.0)
    w.sent(100, "status", 0.0, now=0.0)
    assert w.unacked_bytes == 360
    w.ack(1, 0.0, now=0.1)  # frame 2 and this ack's answer are on their way
    assert w.unacked_bytes == 180 + 160
    w.ack(2, 0.0, now=0.2)  # the first answer went ahead of ... nothing newer: gone
    assert w.unacked_bytes == 160

def test_ack_removes_what_arrived_and_samples_the_rate_on_the_receivers_clock() -> None:
    w = DeliveryWindow(BARE)
    for i in range(4):
        assert w.sent(1000, "view", 10.0 + i, now=100.0) == i + 1
    assert w.unacked_bytes == 4000
    first = w.ack(1, received_at=50.0, now=100.5)
    assert first.outcome is AckOutcome.ACCEPTED and first.produced_at == [("view", 10.0)]
    assert first.rate_sample is None  # one receive time gives no span yet
    result = w.ack(3, received_at=50.25, now=103.0)  # the ack itself came late: irrelevant
    assert result.rate_sample == pytest.approx(2000 / 0.25)
    assert w.bytes_per_s == pytest.approx(8000)
    assert w.unacked_bytes == 1000 and w.in_flight(103.0) == 1000
    w.sent(1000, "view", 14.0, now=103.0)
    w.ack(5, received_at=51.25, now=104.0)  # a link not filled: a low sample ...
    assert w.bytes_per_s == pytest.approx(8000)  # ... does not drag the estimate down
    w.sent(1000, "view", 14.0, now=104.0)
    w.ack(6, received_at=54.0, now=104.0)  # the fast sample left the window
    assert w.bytes_per_s == pytest.approx(1000 / 2.75)
    assert "0 B unacked, 364 B/s" in repr(w)


def test_receive_times_squeezed_together_do_not_inflate_the_rate() -> None:
    """A subscriber that reads frames late gives short receive spans; the bytes were
    sent further apart than that, and cannot have arrived faster. Spans under
    MIN_SAMPLE_S give no sample at all: their bytes count in the next one."""
    w = DeliveryWindow(BARE)  # a 4 kB/s link, 2 kB frames ack-clocked: 0.5 s each
    w.sent(2000, "view", 0.0, now=0.0)
    w.ack(1, received_at=10.5, now=0.5)
    w.sent(2000, "view", 0.0, now=0.5)
    assert w.ack(2, received_at=11.0, now=1.0).rate_sample == pytest.approx(4000)
    w.sent(2000, "view", 0.0, now=1.0)
    # frame 3 arrived at 11.5, read 0.2 s early on this clock's view of it (the
    # previous one was read late): 6.7 kB/s on the receive times alone
    assert w.ack(3, received_at=11.3, now=1.5).rate_sample == pytest.approx(4000)
    w.sent(2000, "view", 0.0, now=1.5)
    assert w.ack(4, received_at=11.4, now=2.0).rate_sample is None  # 0.1 s: wait ...
    w.sent(2000, "view", 0.0, now=2.0)
    assert w.ack(5, received_at=12.5, now=2.5).rate_sample == pytest.approx(4000 / 1.2)  # ... and count it
    assert w.bytes_per_s == pytest.approx(4000)


def test_future_and_backward_sequence_numbers_are_ignored_and_counted() -> None:
    w = DeliveryWindow(BARE)
    for _ in range(3):
        w.sent(500, "status", 0.0, now=1.0)
    assert w.ack(7, 0.0, now=1.1).outcome is AckOutcome.FUTURE
    assert w.ack(2, 0.0, now=1.2).outcome is AckOutcome.ACCEPTED
    assert w.ack(1, 0.0, now=1.3).outcome is AckOutcome.BACKWARDS
    assert w.ack(2, 0.0, now=1.4).outcome is AckOutcome.ACCEPTED  # a repeat is harmless
    assert w.ignored_acks == 2 and w.acked_seq == 2 and w.unacked_bytes == 500


def test_with_feedback_a_heavy_frame_waits_for_an_ack_not_for_time() -> None:
    w = DeliveryWindow(FeedbackLimits(frame_overhead_bytes=0, ack_reply_bytes=0, stale_s=3.0, slack_bytes=950))
    w.sent(100, "status", 0.0, now=0.0)
    w.ack(1, 0.0, now=0.1)
    assert w.may_send(900, now=0.1)
    w.sent(900, "view", 0.0, now=0.1)
    w.sent(100, "status", 0.0, now=0.2)
    # 1000 bytes in flight, more than the 900-byte frame: held, however long it takes
    assert not w.may_send(900, now=0.2) and not w.may_send(900, now=2.5)
    w.ack(2, 0.0, now=2.6)  # the view arrived; the status (100 B) still in flight
    assert w.may_send(900, now=2.6)


def test_on_a_slow_link_the_slack_is_a_fraction_of_a_second_of_it() -> None:
    w = DeliveryWindow(FeedbackLimits(frame_overhead_bytes=0, ack_reply_bytes=0, slack_bytes=1500, slack_s=0.2,
                                      floor_bytes_per_s=1.0))
    w.sent(4000, "view", 0.0, now=0.0)
    w.ack(0, received_at=10.0, now=0.0)
    w.ack(1, received_at=11.0, now=1.0)  # 4000 B/s: 0.2 s of it is 800 B
    assert w.bytes_per_s == pytest.approx(4000)
    w.sent(900, "status", 0.0, now=1.0)
    assert not w.may_send(700, now=1.0)  # 900 B in flight: under 1500 B, over 0.2 s
    w.sent(100, "status", 0.0, now=1.1)
    w.ack(2, received_at=11.3, now=1.3)
    assert w.may_send(700, now=1.3)  # 100 B


def test_a_rate_measured_on_light_frames_alone_does_not_hold_views_behind_ack_answers() -> None:
    """A new stream on a fast link whose trainer publishes no views yet: its acks
    measure only the statuses sent (~500 B/s); the slack stays one ack answer and a
    status, so the first view goes right after an ack (it once waited 1.5-2.3 s)."""

    def light_only(limits: FeedbackLimits) -> tuple[DeliveryWindow, float]:
        w = DeliveryWindow(limits)  # 80 B of headers per frame, 300 B per ack answer
        now = 0.0
        for k in range(1, 9):  # a keepalive status each 0.5 s, each acked on arrival
            now = 0.5 * k
            w.sent(150, "status", now, now=now)
            w.ack(w.last_seq, received_at=now, now=now)
        return w, now

    w, now = light_only(FeedbackLimits())
    assert w.bytes_per_s is not None and w.bytes_per_s < 1500  # what was sent, not the link
    assert w.in_flight(now) == 300  # the last ack's answer
    assert w.may_send(700, now=now)
    w.sent(150, "status", now, now=now)  # a status behind it still leaves room
    assert w.may_send(700, now=now)
    # The slack scaled by that rate alone (~200 B) held the view behind the ack answer.
    held, now = light_only(FeedbackLimits(min_slack_bytes=0))
    assert not held.may_send(700, now=now)


def test_between_acks_the_estimate_drains_at_most_at_the_floor_rate() -> None:
    w = DeliveryWindow(FeedbackLimits(frame_overhead_bytes=0, ack_reply_bytes=0, floor_bytes_per_s=1000))
    for _ in range(3):
        w.sent(1000, "view", 0.0, now=0.0)
    w.ack(1, received_at=10.0, now=0.5)
    w.ack(2, received_at=10.5, now=1.0)  # 1000 B in 0.5 s of receive time: 2000 B/s
    assert w.bytes_per_s == pytest.approx(2000)
    w.sent(500, "status", 0.0, now=1.0)
    assert w.in_flight(1.0) == 1500
    assert w.in_flight(1.5) == pytest.approx(1000)  # the floor (1000 B/s), below the measured 2000
    w.ack(3, received_at=10.6, now=1.6)  # the ack says what really arrived
    assert w.in_flight(1.6) == 500


def test_without_feedback_the_cap_drains_at_the_floor_rate() -> None:
    w = DeliveryWindow(FeedbackLimits(frame_overhead_bytes=0, ack_reply_bytes=0, cap_bytes=4000, floor_bytes_per_s=8000))
    for _ in range(8):
        w.sent(1000, "view", 0.0, now=10.0)
    assert w.in_flight(10.0) == 8000 and not w.may_send(1000, now=10.0)
    assert w.in_flight(10.25) == pytest.approx(6000)
    assert w.may_send(1000, now=10.5)  # 4000 left: within the cap
    # the write-blocking estimate is not trusted (it creeps up between blocked writes)
    assert w.in_flight(10.25, fallback_bytes_per_s=1e9) == pytest.approx(6000)


def test_a_subscriber_that_stops_acking_falls_back_to_the_cap() -> None:
    w = DeliveryWindow(FeedbackLimits(frame_overhead_bytes=0, ack_reply_bytes=0, cap_bytes=3000, floor_bytes_per_s=1000, stale_s=2.0))
    w.sent(500, "view", 0.0, now=0.0)
    w.ack(1, 1.0, now=0.1)
    assert w.has_feedback(1.0)
    for _ in range(4):
        w.sent(1000, "view", 0.0, now=1.0)
    assert not w.may_send(1000, now=2.0)  # fresh feedback: 4000 B in flight, never drained
    assert not w.has_feedback(2.2)  # no ack for 2.1 s: the cap, draining at the floor rate
    assert w.in_flight(2.2) == pytest.approx(4000 - 1.2 * 1000)
    assert w.may_send(1000, now=2.2)


def test_a_subscriber_that_said_it_acks_gets_one_view_in_flight_until_its_first_ack() -> None:
    """Not the cap's worth on a link of unknown speed: one view, then its ack (or, after
    stale_s without one, the cap as for a subscriber that never acks)."""
    limits = FeedbackLimits(frame_overhead_bytes=0, ack_reply_bytes=0, cap_bytes=6000, stale_s=3.0)
    w = DeliveryWindow(limits, expects_acks=True, now=10.0)
    assert w.awaiting_first_ack(10.0) and w.may_send(900, now=10.0)
    w.sent(300, "status", 0.0, now=10.0)
    assert w.may_send(900, now=10.0)  # light frames do not hold the first view
    w.sent(900, "view", 0.0, now=10.0)
    assert not w.may_send(900, now=10.5)  # an unknown cap's worth would go here
    assert not w.may_send(900, now=12.9)  # nor before the drained estimate says so
    w.ack(2, 12.9, now=13.0)  # the view arrived
    assert not w.awaiting_first_ack(13.0) and w.may_send(900, now=13.0)
    # the same subscriber, had no ack come: the cap after stale_s
    w = DeliveryWindow(limits, expects_acks=True, now=10.0)
    w.sent(900, "view", 0.0, now=10.0)
    assert not w.may_send(900, now=13.0)
    assert not w.awaiting_first_ack(13.1) and w.may_send(900, now=13.1)
    # a subscriber that did not say it acks: the cap from the start
    w = DeliveryWindow(limits, now=10.0)
    w.sent(900, "view", 0.0, now=10.0)
    assert not w.awaiting_first_ack(10.0) and w.may_send(900, now=10.0)


def test_the_record_of_frames_is_bounded_for_subscribers_that_never_ack() -> None:
    w = DeliveryWindow(FeedbackLimits(frame_overhead_bytes=0, ack_reply_bytes=0, max_records=10))
    for i in range(1000):
        w.sent(10, "scalars", 0.0, now=float(i))
    assert len(w._sent) == 10 and w.unacked_bytes == 100 and w.acked_seq == 990
    assert w.ack(995, 0.0, now=1000.0).outcome is AckOutcome.ACCEPTED


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="floor_bytes_per_s must be > 0, got 0"):
        FeedbackLimits(floor_bytes_per_s=0)
    with pytest.raises(ValueError, match="stale_s"):
        FeedbackLimits(stale_s=math.nan)
    with pytest.raises(ValueError, match="slack_s"):
        FeedbackLimits(slack_s=0)
    with pytest.raises(ValueError, match="min_slack_bytes must be >= 0, got -1"):
        FeedbackLimits(min_slack_bytes=-1)


# -- the hub ---------------------------------------------------------------------

def test_frames_carry_sequence_numbers_and_the_first_one_the_subscription_id() -> None:
    hub, clock = _hub()
    hub.publish(_status(1))
    sub = hub.subscribe("r")
    frames = [spb.Frame.FromString(hub.numbered(sub, out)) for out in hub._snapshot(sub)]
    hub.publish(_status(2))
    clock.now += 1.0
    hub.tick()
    frames += _send_all(hub, sub)
    assert [f.seq for f in frames] == [1, 2]
    assert frames[0].subscription_id == sub.id and len(sub.id) >= 16
    assert frames[1].subscription_id == "" and frames[1].status.step == 2


def test_an_acking_subscriber_gets_the_next_view_when_the_previous_one_arrived() -> None:
    hub, clock = _hub(frame_overhead_bytes=0, ack_reply_bytes=0, slack_bytes=50)
    sub = hub.subscribe("r", max_fps=30)
    hub.publish(_status(1))
    hub.tick()
    first = _send_all(hub, sub)
    hub.ack(sub.id, "r", first[-1].seq, received_at=clock.now)
    hub.publish(_view(1))
    hub.tick()
    sent = _send_all(hub, sub)
    assert [f.view.step for f in sent if f.HasField("view")] == [1]
    for step in range(2, 6):  # the link is slow: no ack comes for a second
        hub.publish(_view(step))
        clock.now += 0.2
        hub.tick()
        assert not sub.views_due, step  # view 1 is still in flight
        _send_all(hub, sub)  # statuses go out meanwhile
    reply = hub.ack(sub.id, "r", sub.window.last_seq, received_at=clock.now)
    assert reply.server_time == clock.now and reply.in_flight_bytes == 0
    assert sub.views_due and sub.wake.is_set()  # released by the ack, not by the next tick
    views = [f.view.step for f in _send_all(hub, sub) if f.HasField("view")]
    assert views == [5]  # latest wins: 2..4 were skipped
    assert sub.views_skipped == 3


def test_a_subscriber_that_said_it_acks_waits_for_its_first_ack_after_the_snapshot_view() -> None:
    """Through the hub: the snapshot's view goes, the next views wait for the first ack
    (an old client, or one that did not say so, gets them under the cap)."""
    for acks in (True, False):
        hub, clock = _hub(frame_overhead_bytes=0, ack_reply_bytes=0)
        hub.publish(_status(1))
        hub.publish(_view(1))
        sub = hub.subscribe("r", max_fps=30, acks=acks)
        snapshot = []
        for out in hub._snapshot(sub):  # as the servicer writes it
            data = hub.numbered(sub, out)
            hub.record_write(sub, len(data), 0.0, out.kind)
            snapshot.append(spb.Frame.FromString(data))
        assert [f.view.step for f in snapshot if f.HasField("view")] == [1]
        hub.publish(_view(2))
        clock.now += 0.5
        hub.tick()
        views = [f.view.step for f in _send_all(hub, sub) if f.HasField("view")]
        assert views == ([] if acks else [2]), acks
        if acks:
            hub.ack(sub.id, "r", sub.window.last_seq, received_at=clock.now)
            assert [f.view.step for f in _send_all(hub, sub) if f.HasField("view")] == [2]


def test_ack_for_an_unknown_or_ended_subscription_is_not_found() -> None:
    hub, _ = _hub()
    sub = hub.subscribe("r")
    with pytest.raises(NotFoundError, match="no subscription 'nope'"):
        hub.ack("nope", "r", 1, 0.0)
    with pytest.raises(NotFoundError, match="to run 'other'"):
        hub.ack(sub.id, "other", 1, 0.0)
    with pytest.raises(InvalidArgumentError, match="subscription_id is empty"):
        hub.ack("", "r", 1, 0.0)
    with pytest.raises(InvalidArgumentError, match="received_at must be"):
        hub.ack(sub.id, "r", 0, math.nan)
    hub.ack(sub.id, "", 0, 0.0)  # run_id may be left out; seq 0 = nothing yet
    hub.unsubscribe(sub)
    with pytest.raises(NotFoundError):
        hub.ack(sub.id, "r", 0, 0.0)
    assert hub.subscriptions == {}


def test_future_acks_through_the_hub_change_nothing() -> None:
    hub, clock = _hub()
    sub = hub.subscribe("r")
    hub.publish(_status(1))
    hub.tick()
    _send_all(hub, sub)
    before = sub.window.unacked_bytes
    hub.ack(sub.id, "r", 10**12, received_at=clock.now)
    assert sub.window.unacked_bytes == before and sub.window.ignored_acks == 1
    assert not sub.window.has_feedback(clock.now)


def test_the_snapshot_history_is_coarse_but_covers_every_step() -> None:
    hub, _ = _hub()
    for first in range(1, 5000, 10):  # 500 batches: the history keeps 1024 buckets
        hub.publish(_scalars(first, first + 9))
    sub = hub.subscribe("r", max_points=32)
    (frame,) = [spb.Frame.FromString(d) for d in hub.snapshot(sub)]
    (series,) = frame.scalars.series
    assert len(series.steps) <= 64
    assert _covered([frame]) == list(range(1, 5001))


def test_scalars_are_down_sampled_for_the_floor_until_acks_measured_the_rate() -> None:
    hub, clock = _hub(floor_bytes_per_s=2000)
    sub = hub.subscribe("r", max_points=64)
    hub.snapshot(sub)
    hub.publish(_status(1))
    hub.tick()
    _send_all(hub, sub)
    hub.ack(sub.id, "r", sub.window.last_seq, received_at=clock.now)  # feedback, no rate yet
    assert sub.window.has_feedback(clock.now) and sub.window.bytes_per_s is None
    hub.publish(_scalars(1, 500))
    clock.now += 1.0
    hub.tick()
    frames = [f for f in _send_all(hub, sub) if f.HasField("scalars")]
    (series,) = frames[0].scalars.series
    # 15 % of 2000 B/s for 0.2 s: 60 B, a few buckets (never the 64 points asked for)
    assert len(series.steps) < 10
    assert _covered(frames) == list(range(1, 501))
