"""UpdateHub: coalescing mailboxes, driven by an injected clock (no network, no sleeps)."""

from __future__ import annotations

import asyncio

import pytest

from services.streamer.hub import HubLimits, Pacer, UpdateHub
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data import arrays
from tensorwire.data.scalars import ScalarBuffer, to_batch
from tensorwire.errors import InvalidArgumentError, ResourceExhaustedError
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tests.support.clock import FakeClock


def _hub(**limits: float) -> tuple[UpdateHub, FakeClock]:
    clock = FakeClock()
    return UpdateHub(HubLimits(**limits), clock=clock, wall=clock), clock  # type: ignore[arg-type]


def _status(step: int) -> spb.PublishRequest:
    return spb.PublishRequest(
        run_id="r", step=step, produced_at=float(step),
        status=cpb.RunStatus(run_id="r", step=step, state=cpb.RUN_STATE_RUNNING, produced_at=float(step)),
    )


def _scalars(first: int, last: int) -> spb.PublishRequest:
    buf = ScalarBuffer(1000)
    for step in range(first, last + 1):
        buf.add(step, {"loss": 1.0 / step})
    return spb.PublishRequest(run_id="r", step=last, scalars=to_batch(buf.take()))


def _view(step: int, kind: str = "boundary") -> spb.PublishRequest:
    view = cpb.View(kind=kind, step=step, produced_at=float(step))
    view.arrays.append(arrays.encode("grid", [[step, 0.5]], cpb.DTYPE_F16, cpb.CODEC_DEFLATE))
    return spb.PublishRequest(run_id="r", step=step, produced_at=float(step), view=view)


def _frames(hub: UpdateHub, sub: object) -> list[spb.Frame]:
    return [spb.Frame.FromString(out.data) for out in hub.due_frames(sub)]  # type: ignore[arg-type]


def _covered(frames: list[spb.Frame]) -> list[int]:
    steps: list[int] = []
    for f in frames:
        for s in f.scalars.series:
            firsts = list(s.first_steps) or list(s.steps)
            for first, last in zip(firsts, s.steps, strict=True):
                steps.extend(range(first, last + 1))
    return steps


def test_snapshot_then_status_first_and_latest_view_wins() -> None:
    hub, clock = _hub()
    hub.publish(_status(10))
    hub.publish(_scalars(1, 10))
    hub.publish(_view(10))
    sub = hub.subscribe("r", accept_codecs=[cpb.CODEC_DEFLATE])
    snap = [spb.Frame.FromString(d) for d in hub.snapshot(sub)]
    assert [f.WhichOneof("body") for f in snap] == ["status", "scalars", "view"]
    assert all(f.snapshot for f in snap)
    assert _covered(snap) == list(range(1, 11))
    assert snap[2].view.step == 10 and snap[2].produced_at == 10.0

    for step in (11, 12, 13):  # three views while the subscriber was busy
        hub.publish(_view(step))
    hub.publish(_status(13))
    hub.publish(_scalars(11, 13))
    clock.now += 1.0
    hub.tick()
    assert sub.wake.is_set()
    frames = _frames(hub, sub)
    assert [f.WhichOneof("body") for f in frames] == ["status", "scalars", "view"]
    assert frames[0].status.step == 13
    assert _covered(frames) == [11, 12, 13]
    assert frames[2].view.step == 13  # 11 and 12 were skipped, not queued
    assert sub.views_skipped == 2
    assert all(f.sent_at == clock.now for f in frames)


def test_scalars_are_merged_never_dropped_for_a_slow_subscriber() -> None:
    hub, clock = _hub(default_max_points=16)
    sub = hub.subscribe("r")
    for i in range(200):  # 200 batches arrive while the subscriber cannot send
        hub.publish(_scalars(i * 10 + 1, i * 10 + 10))
    clock.now += 1
    hub.tick()
    frames = _frames(hub, sub)
    assert len(frames[-1].scalars.series[0].steps) <= 16
    assert _covered(frames) == list(range(1, 2001))


def test_lagging_subscriber_keeps_points_when_the_log_is_trimmed() -> None:
    hub, clock = _hub(max_log_chunks=4, default_max_points=8)
    slow = hub.subscribe("r")
    fast = hub.subscribe("r")
    covered_fast: list[int] = []
    for i in range(20):
        hub.publish(_scalars(i * 5 + 1, i * 5 + 5))
        clock.now += 0.3
        hub.tick()
        covered_fast += _covered(_frames(hub, fast))
        slow.scalars_due = False  # the slow one never gets to write
    assert covered_fast == list(range(1, 101))
    assert len(slow.topic.log) <= 4
    clock.now += 1
    hub.tick()
    assert _covered(_frames(hub, slow)) == list(range(1, 101))


def test_keepalive_status_even_with_nothing_new() -> None:
    hub, clock = _hub(keepalive_s=1.0)
    sub = hub.subscribe("r")
    assert hub.snapshot(sub) == []  # nothing published yet ...
    hub.tick()
    assert [f.WhichOneof("body") for f in _frames(hub, sub)] == ["status"]  # ... but a status at once
    sub.wake.clear()
    clock.now += 0.5
    hub.tick()
    assert not sub.wake.is_set()
    clock.now += 0.6
    hub.tick()
    frames = _frames(hub, sub)
    assert [f.WhichOneof("body") for f in frames] == ["status"]
    assert frames[0].status.run_id == "r"  # a run nobody published yet still gets keep-alives


def test_views_respect_max_fps_and_pacing() -> None:
    hub, clock = _hub()
    sub = hub.subscribe("r", max_fps=2)
    hub.snapshot(sub)
    hub.publish(_view(1))
    hub.tick()
    data = [out.data for out in hub.due_frames(sub) if out.heavy]
    hub.record_write(sub, len(data[0]), 0.0, "view")
    hub.publish(_view(2))
    clock.now += 0.25
    hub.tick()
    assert not sub.views_due  # 2 fps: not before 0.5 s
    clock.now += 0.3
    hub.tick()
    assert sub.views_due


def test_pacer_estimates_bandwidth_from_blocked_writes() -> None:
    pacer = Pacer(headroom=2.0)
    assert pacer.spacing_s(10_000) == 0.0
    pacer.record(12_500, 0.1)  # 125 kB/s = 1 Mbit/s
    assert pacer.spacing_s(12_500) == pytest.approx(0.2)
    for _ in range(5):
        pacer.record(100, 0.0)  # fast writes: the estimate creeps up
    assert pacer.spacing_s(12_500) < 0.2


def test_subscriber_cap_bad_options_and_disconnect() -> None:
    hub, _ = _hub(max_subscribers=2)
    a = hub.subscribe("r")
    hub.subscribe("r")
    with pytest.raises(ResourceExhaustedError, match="limit"):
        hub.subscribe("r")
    hub.unsubscribe(a)
    assert hub.subscriber_count == 1
    hub.subscribe("other")
    for kwargs, needle in (({"max_fps": -1.0}, "max_fps"), ({"max_points": 1}, "max_points"),
                           ({"max_fps": 1000.0}, "max_fps")):
        with pytest.raises(InvalidArgumentError, match=needle):
            hub.subscribe("r", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="run_id"):
        hub.subscribe("")
    with pytest.raises(InvalidArgumentError, match="no body"):
        hub.publish(spb.PublishRequest(run_id="r"))


def test_watchers_and_demand_reach_the_publisher() -> None:
    hub, _ = _hub()
    pub = hub.add_publisher()
    hub.publish(_status(1), pub)
    pub.changed.clear()
    sub = hub.subscribe("r", max_fps=5, views=["boundary"])
    assert pub.changed.is_set()
    reply = hub.watchers(pub.runs)
    assert reply.watchers["r"] == 1
    assert list(reply.demand["r"].views) == ["boundary"] and reply.demand["r"].max_fps == 5
    hub.unsubscribe(sub)
    assert hub.watchers(pub.runs).watchers["r"] == 0


def test_a_link_that_skips_views_asks_for_twice_what_it_carries() -> None:
    """While views are skipped for a subscriber whose acks measure its link, the demand
    is twice the views a second that link carries (rate / view size, at least
    min_demand_fps): a slow viewer does not make the trainer build views nobody sees.
    It is the subscriber's max_fps again once a window skips none or its acks go
    stale, and the fastest subscriber sets the run's demand."""
    hub, clock = _hub()
    pub = hub.add_publisher()
    hub.publish(_status(1), pub)
    slow = hub.subscribe("r", max_fps=20)
    hub.snapshot(slow)

    def second(views: int, every: int, *, link_bytes_per_s: float = 4000.0, acked: bool = True) -> float:
        """``views`` views over one second, the link taking every ``every``-th (500 B
        each) and measured at ``link_bytes_per_s``; the run's demand after it."""
        for i in range(views):
            clock.advance(1.0 / views)
            hub.publish(_view(i + 2), pub)
            if i % every == every - 1:
                slow.pending_views.clear()
                hub.record_write(slow, 500, 0.0, "view")
        clock.advance(1e-6)  # the window is at least a second
        slow.window.bytes_per_s = link_bytes_per_s  # as acks would measure it
        if acked:
            slow.window.last_ack_at = clock()
        return hub.watchers(pub.runs).demand["r"].max_fps

    assert hub.watchers(pub.runs).demand["r"].max_fps == 20  # opens the first window
    assert second(20, every=5) == pytest.approx(16.0)  # 2 x 4000 / 500
    assert second(16, every=2, link_bytes_per_s=2000.0) == pytest.approx(8.0)
    assert second(8, every=8, link_bytes_per_s=500.0) == pytest.approx(4.0)  # the floor
    assert second(4, every=1) == 20  # took every view: no cap
    assert second(20, every=5) == pytest.approx(16.0)
    clock.advance(hub.limits.feedback.stale_s)
    assert second(20, every=5, acked=False) == 20  # its acks stopped: the link is not measured
    assert second(20, every=20, link_bytes_per_s=500.0) == pytest.approx(4.0)
    hub.subscribe("r", max_fps=15)
    assert hub.watchers(pub.runs).demand["r"].max_fps == 15


def test_views_are_serialized_once_and_recoded_per_codec() -> None:
    hub, _ = _hub()
    hub.publish(_view(3))
    deflate = [hub.subscribe("r", accept_codecs=[cpb.CODEC_DEFLATE]) for _ in range(3)]
    plain = hub.subscribe("r")
    cached = hub.topics["r"].views["boundary"]
    bodies = {hub.snapshot(s)[0].split(b"\x38\x01")[0] for s in deflate}
    assert len(cached._frames) == 1 and len(bodies) == 1
    frame = spb.Frame.FromString(hub.snapshot(plain)[0])
    assert frame.view.arrays[0].codec == cpb.CODEC_UNSPECIFIED
    assert arrays.decode(frame.view.arrays[0])[0, 0] == 3.0


def _dataset_view(step: int, points: list[list[float]]) -> spb.PublishRequest:
    """A view whose grid changes every step beside a dataset that does not."""
    view = cpb.View(kind="boundary", step=step, produced_at=float(step))
    view.arrays.append(arrays.encode("grid", [[step, step + 0.5]], cpb.DTYPE_F32, cpb.CODEC_UNSPECIFIED))
    view.arrays.append(arrays.encode("points", points, cpb.DTYPE_F32, cpb.CODEC_UNSPECIFIED))
    view.arrays.append(arrays.encode("labels", [0, 1, 1], cpb.DTYPE_U8, cpb.CODEC_UNSPECIFIED))
    return spb.PublishRequest(run_id="r", step=step, produced_at=float(step), view=view)


def _next_view(hub: UpdateHub, clock: FakeClock, sub: object) -> spb.Frame:
    clock.now += 1.0
    hub.tick()
    views = [f for f in _frames(hub, sub) if f.HasField("view")]
    assert len(views) == 1
    return views[0]


def test_reuse_arrays_sends_a_dataset_once_per_stream_and_the_client_rebuilds_the_view() -> None:
    from tensorwire.live import HeldArrays

    hub, clock = _hub()
    dataset = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    hub.publish(_status(1))
    hub.publish(_dataset_view(1, dataset))
    reuse = hub.subscribe("r", reuse_arrays=True)
    plain = hub.subscribe("r")
    held = HeldArrays()
    first = [spb.Frame.FromString(d) for d in hub.snapshot(reuse)][-1]
    assert not any(a.unchanged for a in first.view.arrays)  # a new stream gets everything
    held.fill(first)
    hub.snapshot(plain)

    hub.publish(_dataset_view(2, dataset))
    second = _next_view(hub, clock, reuse)
    by_name = {a.name: a for a in second.view.arrays}
    assert [a.name for a in second.view.arrays] == ["grid", "points", "labels"]  # order kept
    assert not by_name["grid"].unchanged and by_name["grid"].data
    assert by_name["points"].unchanged and not by_name["points"].data
    assert by_name["labels"].unchanged and not by_name["labels"].data
    full = _next_view(hub, clock, plain)
    assert second.ByteSize() < full.ByteSize() - 24  # the dataset's bytes stayed home
    held.fill(second)
    assert second.view == full.view  # what the client shows is the whole view

    # The dataset changes (a new task parameter): it is sent again, once.
    moved = [[9.0, 9.0], *dataset[1:]]
    hub.publish(_dataset_view(3, moved))
    third = _next_view(hub, clock, reuse)
    assert not any(a.unchanged for a in third.view.arrays if a.name == "points")
    assert [a.name for a in third.view.arrays if a.unchanged] == ["labels"]
    held.fill(third)
    assert arrays.decode(third.view.arrays[1]).tolist() == moved

    # A new subscription starts from nothing on both sides.
    again = hub.subscribe("r", reuse_arrays=True)
    assert not any(a.unchanged for a in spb.Frame.FromString(hub.snapshot(again)[-1]).view.arrays)


def test_an_array_named_unchanged_that_never_came_is_an_error_not_a_blank_view() -> None:
    from tensorwire.live import HeldArrays

    frame = spb.Frame(view=cpb.View(kind="boundary", arrays=[cpb.Array(name="points", unchanged=True)]))
    with pytest.raises(ValueError, match="points"):
        HeldArrays().fill(frame)


def test_light_frames_fit_their_share_of_a_slow_link() -> None:
    """Status and scalar frames cost their headers whatever they hold: on a link
    acks measured at 16 kbit/s they are spaced to fit their shares (10 % and 15 %),
    on a fast one they go at the base intervals."""
    hub, clock = _hub()
    hub.publish(_status(1))
    slow, fast = hub.subscribe("r"), hub.subscribe("r")
    for sub, rate in ((slow, 2000.0), (fast, 125_000.0)):
        hub.snapshot(sub)
        sub.window.bytes_per_s = rate  # as acks measured it
    sent = {id(slow): {"status": 0, "scalars": 0}, id(fast): {"status": 0, "scalars": 0}}
    for i in range(2, 202):  # 10 s: a new status and scalars every 50 ms
        clock.now += 0.05
        for sub in (slow, fast):
            sub.window.last_ack_at = clock.now  # feedback stays fresh
        hub.publish(_status(i))
        hub.publish(_scalars(10 * i, 10 * i + 9))
        hub.tick()
        for sub in (slow, fast):
            for f in _frames(hub, sub):
                kind = f.WhichOneof("body")
                if kind in sent[id(sub)]:
                    sent[id(sub)][kind] += 1
    status_wire = len(hub.topics["r"].status_frame) + 80
    slow_sent, fast_sent = sent[id(slow)], sent[id(fast)]
    assert fast_sent["status"] >= 30 and fast_sent["scalars"] >= 38, fast_sent  # every 0.25 / 0.2 s (50 ms ticks)
    assert slow_sent["status"] * status_wire / 10 <= 0.1 * 2000 * 1.15, (slow_sent, status_wire)
    assert slow_sent["status"] >= 9, slow_sent  # never under the 1 s keepalive
    assert slow_sent["scalars"] < 0.75 * fast_sent["scalars"], (slow_sent, fast_sent)
    assert slow_sent["scalars"] >= 9, slow_sent


def test_light_frames_of_an_acking_subscriber_wait_for_its_rate_to_be_measured() -> None:
    """Until acks measure its rate, a subscriber that said it acks gets light frames
    spaced for the startup rate (16 kbit/s): its first acks' answers must not wait
    behind seconds of them. One that never acks keeps the base intervals."""
    hub, clock = _hub()
    hub.publish(_status(1))
    acking, plain = hub.subscribe("r", acks=True), hub.subscribe("r")
    sent = {id(acking): 0, id(plain): 0}
    for sub in (acking, plain):
        hub.snapshot(sub)
    for i in range(2, 42):  # 2 s: a new status and scalars every 50 ms, no ack
        clock.now += 0.05
        hub.publish(_status(i))
        hub.publish(_scalars(10 * i, 10 * i + 9))
        hub.tick()
        for sub in (acking, plain):
            sent[id(sub)] += len(_frames(hub, sub))
    startup = hub.limits.feedback.startup_bytes_per_s
    assert acking.window.light_rate(clock.now) == startup and plain.window.light_rate(clock.now) is None
    assert sent[id(plain)] >= 12, sent  # statuses every 0.25 s, scalars every 0.2 s
    assert 2 <= sent[id(acking)] <= 0.6 * sent[id(plain)], sent  # spaced for 2 KB/s (small frames: ~0.65 s)
    acking.window.last_ack_at, acking.window.bytes_per_s = clock.now, 125_000.0  # acks measured a fast link
    assert acking.window.light_rate(clock.now) == 125_000.0


def test_a_publisher_may_not_mark_arrays_unchanged() -> None:
    """Array.unchanged is the streamer's word to a subscriber: from a publisher it
    would leave fresh subscribers with a view they cannot rebuild."""
    hub, _ = _hub()
    req = _dataset_view(1, [[0.0, 1.0]])
    req.view.arrays[1].unchanged = True
    with pytest.raises(InvalidArgumentError, match="'points' is marked unchanged"):
        hub.publish(req)
    assert "boundary" not in hub.topics["r"].views


async def test_a_quiet_live_topic_takes_a_lost_final_state_from_the_lookup() -> None:
    """A run whose final state never arrived (its trainer's stream broke after the write)
    shows as ended once it has been quiet for quiet_recheck_s; a paused run stays paused,
    and a topic that is published to is never checked."""
    stored = {"r": cpb.RUN_STATE_PAUSED}
    asked: list[tuple[str, int]] = []

    async def lookup(run_id: str, max_points: int) -> tuple[cpb.RunStatus, cpb.ScalarBatch] | None:
        asked.append((run_id, max_points))
        return cpb.RunStatus(run_id=run_id, step=20, state=stored[run_id]), cpb.ScalarBatch()

    clock = FakeClock()
    hub = UpdateHub(HubLimits(quiet_recheck_s=10.0), clock=clock, wall=clock, lookup=lookup)  # type: ignore[arg-type]
    hub.publish(_status(5))
    sub = hub.subscribe("r")
    for _ in range(9):  # published to every second: never checked
        clock.now += 1.0
        hub.publish(_status(5))
        hub.tick()
    await asyncio.sleep(0)
    assert asked == []
    clock.now += 10.0  # quiet: checked; the store says paused, so nothing changes
    hub.tick()
    await asyncio.sleep(0)
    assert asked == [("r", 1)] and hub.topics["r"].status.state == cpb.RUN_STATE_RUNNING
    clock.now += 5.0
    hub.tick()
    await asyncio.sleep(0)
    assert len(asked) == 1  # at most every quiet_recheck_s
    stored["r"] = cpb.RUN_STATE_COMPLETED
    clock.now += 5.0
    hub.tick()
    await asyncio.sleep(0)
    assert len(asked) == 2
    assert hub.topics["r"].status.state == cpb.RUN_STATE_COMPLETED and hub.topics["r"].status.step == 20
    assert [f.status.state for f in _frames(hub, sub) if f.HasField("status")][-1] == cpb.RUN_STATE_COMPLETED
    clock.now += 30.0  # ended: never asked again
    hub.tick()
    await asyncio.sleep(0)
    assert len(asked) == 2
    # Unwatched, a lost final state would keep the topic in memory: checked too, then released.
    hub.unsubscribe(sub)
    stored["q"] = cpb.RUN_STATE_STOPPED
    hub.publish(spb.PublishRequest(run_id="q", status=cpb.RunStatus(run_id="q", state=cpb.RUN_STATE_RUNNING)))
    clock.now += 10.0
    hub.tick()
    await asyncio.sleep(0)
    assert hub.topics["q"].status.state == cpb.RUN_STATE_STOPPED
    clock.now += 30.0
    hub.tick()
    assert "q" not in hub.topics and "r" not in hub.topics


async def _checked_after_quiet(lookup: object) -> tuple[UpdateHub, FakeClock]:
    """A hub with ``lookup`` whose run "r" published once, then stayed quiet past
    quiet_recheck_s (10 s): its check has been started."""
    clock = FakeClock()
    hub = UpdateHub(HubLimits(quiet_recheck_s=10.0), clock=clock, wall=clock, lookup=lookup)  # type: ignore[arg-type]
    hub.publish(_status(5))
    clock.now += 10.0
    hub.tick()
    await asyncio.sleep(0)
    return hub, clock


async def test_a_new_viewer_is_seeded_even_while_a_quiet_check_is_pending() -> None:
    release = asyncio.Event()
    calls: list[int] = []

    async def lookup(run_id: str, max_points: int) -> tuple[cpb.RunStatus, cpb.ScalarBatch] | None:
        calls.append(max_points)
        if max_points == 1:
            await release.wait()  # the quiet check hangs
        return cpb.RunStatus(run_id=run_id, step=5, state=cpb.RUN_STATE_PAUSED), cpb.ScalarBatch()

    hub, _ = await _checked_after_quiet(lookup)
    assert calls == [1]
    await asyncio.wait_for(hub.prepare("r"), 5)  # not stuck behind the check
    assert calls == [1, hub.limits.history_points] and hub.topics["r"].seeded
    release.set()
    await hub.aclose()


async def test_a_quiet_check_answered_after_a_newer_publish_changes_nothing() -> None:
    """A run resumed (same id) while the check was on its way: the store's older
    ended state must not cover the live one just published."""
    answer = asyncio.Event()

    async def lookup(run_id: str, max_points: int) -> tuple[cpb.RunStatus, cpb.ScalarBatch] | None:
        await answer.wait()
        return cpb.RunStatus(run_id=run_id, step=5, state=cpb.RUN_STATE_INTERRUPTED), cpb.ScalarBatch()

    hub, clock = await _checked_after_quiet(lookup)
    assert "r" in hub._rechecks  # asked, not answered
    clock.now += 0.1
    hub.publish(_status(6))  # the resumed run publishes
    answer.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert "r" not in hub._rechecks
    assert hub.topics["r"].status.state == cpb.RUN_STATE_RUNNING and hub.topics["r"].status.step == 6
