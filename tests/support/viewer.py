"""A measuring viewer: subscribes like the browser and records what a person would see.

Used by the live-training tests and by tests/benchmarks/bench_live.py (also as a
command inside a network namespace: ``python -m tests.support.viewer ...``, which
prints one JSON line of results).

Per viewer it records: the lag of the view on screen (now minus the production
time of the step it shows, sampled every ``sample_s``), the lag of the scalars
on screen (the trainer's step now, extrapolated from the newest status, minus
the newest scalar step received, over steps/s), the arrival lag of status
frames, heavy frame sizes and the
same frames as JSON, status frame gaps, and whether the scalar series it received
covers every step (no missing ranges). It acknowledges frames like the browser does
(``tensorwire.live.FrameAcker``) unless told not to (``ack=False``: an old client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.live import FrameAcker, HeldArrays
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.streamer.v1 import streamer_pb2_grpc as spb_grpc

VIEWER_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20)]
"""As the streamer's notes ask: BDP probing off keeps the HTTP/2 window small."""


@dataclass
class ViewerStats:
    frames: int = 0
    views: int = 0
    statuses: int = 0
    scalar_frames: int = 0
    view_bytes: list[int] = field(default_factory=list)
    json_bytes: list[int] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    lag_times: list[float] = field(default_factory=list)
    """Wall time of each ``lags`` sample (for a bandwidth step's recovery)."""
    arrival_lags: list[float] = field(default_factory=list)
    send_lags: list[float] = field(default_factory=list)
    """Views: production -> the streamer's send (``sent_at``; same host clock in the tests)."""
    view_gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive live views' arrivals (measured ones)."""
    last_view_at: float = 0.0
    status_lags: list[float] = field(default_factory=list)
    transit_lags: list[float] = field(default_factory=list)
    """Streamer send -> arrival (``sent_at``; same host clock in the tests), any frame."""
    scalar_lags: list[float] = field(default_factory=list)
    acks: int = 0
    in_flight: list[int] = field(default_factory=list)
    """Bytes in flight as the streamer's ack answers said (sampled)."""
    delivery_rates: list[float] = field(default_factory=list)
    """The streamer's delivery rate estimate, bytes/s, as its ack answers said (sampled)."""
    max_status_gap_s: float = 0.0
    first_live_view_s: float | None = None
    scalar_first: int = 0
    scalar_last: int = 0
    scalar_gaps: list[tuple[int, int]] = field(default_factory=list)
    last_status_step: int = 0
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    """Wire bytes of the frames received, by body kind."""
    error: str = ""

    def summary(self) -> dict[str, float | int | str | None]:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {
            "frames": self.frames, "views": self.views, "statuses": self.statuses,
            "scalar_frames": self.scalar_frames, "bytes_by_kind": self.bytes_by_kind,
            "view_bytes_mean": statistics.fmean(self.view_bytes) if self.view_bytes else None,
            "json_bytes_mean": statistics.fmean(self.json_bytes) if self.json_bytes else None,
            "lag_p50": pct(self.lags, 0.5), "lag_p95": pct(self.lags, 0.95),
            "arrival_lag_p50": pct(self.arrival_lags, 0.5), "arrival_lag_p95": pct(self.arrival_lags, 0.95),
            "view_send_lag_p50": pct(self.send_lags, 0.5), "view_send_lag_p95": pct(self.send_lags, 0.95),
            "view_gap_p50": pct(self.view_gaps, 0.5), "view_gap_p95": pct(self.view_gaps, 0.95),
            "view_gap_max": max(self.view_gaps, default=None),
            "transit_p50": pct(self.transit_lags, 0.5), "transit_p95": pct(self.transit_lags, 0.95),
            "status_lag_p50": pct(self.status_lags, 0.5), "status_lag_p95": pct(self.status_lags, 0.95),
            "scalar_lag_p50": pct(self.scalar_lags, 0.5), "scalar_lag_p95": pct(self.scalar_lags, 0.95),
            "acks": self.acks,
            "in_flight_p50": pct([float(b) for b in self.in_flight], 0.5),
            "in_flight_p95": pct([float(b) for b in self.in_flight], 0.95),
            "delivery_rate_p50": pct(self.delivery_rates, 0.5),
            "delivery_rate_p95": pct(self.delivery_rates, 0.95),
            "max_status_gap_s": self.max_status_gap_s, "first_live_view_s": self.first_live_view_s,
            "scalar_first": self.scalar_first, "scalar_last": self.scalar_last,
            "scalar_gaps": len(self.scalar_gaps), "scalar_gap_list": self.scalar_gaps[:5],
            "error": self.error,
        }


def _check_scalars(stats: ViewerStats, frame: spb.Frame, series_name: str) -> None:
    for series in frame.scalars.series:
        if series.name != series_name:
            continue
        has_first = len(series.first_steps) == len(series.steps)
        for i, last in enumerate(series.steps):
            first = series.first_steps[i] if has_first else last
            if stats.scalar_last and first != stats.scalar_last + 1:
                stats.scalar_gaps.append((stats.scalar_last, first))
            if not stats.scalar_first:
                stats.scalar_first = first
            stats.scalar_last = last


async def watch(
    channel: grpc.aio.Channel,
    run_id: str,
    duration_s: float,
    *,
    measure: bool = True,
    json_every: int = 10,
    sample_s: float = 0.05,
    series: str = "loss",
    stats: ViewerStats | None = None,
    live_only: bool = False,
    ack: bool = True,
    warmup_s: float = 0.0,
) -> ViewerStats:
    """Subscribe to ``run_id`` for ``duration_s`` and measure what arrives (lags
    only after ``warmup_s``: the snapshot's own transfer is not steady state)."""
    stats = stats or ViewerStats()
    shown_produced_at: list[float] = []
    newest_status: list[cpb.RunStatus] = []
    scalar_step = [0]
    start = time.monotonic()
    measure_from = time.time() + warmup_s

    async def sample() -> None:
        while True:
            await asyncio.sleep(sample_s)
            now = time.time()
            if now < measure_from:
                continue
            if acker is not None and acker.last_reply is not None:
                stats.in_flight.append(acker.last_reply.in_flight_bytes)
                if acker.last_reply.delivery_bytes_per_s:
                    stats.delivery_rates.append(acker.last_reply.delivery_bytes_per_s)
            if shown_produced_at:
                stats.lags.append(now - shown_produced_at[0])
                stats.lag_times.append(now)
            if newest_status and scalar_step[0] and newest_status[0].steps_per_second > 0:
                st = newest_status[0]
                trainer_step = st.step + (now - st.produced_at) * st.steps_per_second
                stats.scalar_lags.append(max(0.0, trainer_step - scalar_step[0]) / st.steps_per_second)

    stub = spb_grpc.StreamerServiceStub(channel)
    # A client with feedback is today's client: it also keeps each view's arrays.
    call = stub.Subscribe(spb.SubscribeRequest(run_id=run_id, accept_codecs=[cpb.CODEC_DEFLATE], reuse_arrays=ack,
                                                 acks=ack))
    acker = FrameAcker(channel, run_id) if ack else None
    held = HeldArrays()
    sampler = asyncio.create_task(sample()) if measure else None
    last_status = None
    stats.scalar_last = 0  # continuity is checked per subscription
    try:
        async with asyncio.timeout(duration_s):
            async for frame in call:
                now = time.time()
                if acker is not None:
                    acker.received(frame, now)
                wire_bytes = frame.ByteSize()  # what crossed the link, before held arrays fill it
                held.fill(frame)
                stats.frames += 1
                if measure and frame.sent_at and now >= measure_from:
                    stats.transit_lags.append(now - frame.sent_at)
                body = frame.WhichOneof("body")
                stats.bytes_by_kind[str(body)] = stats.bytes_by_kind.get(str(body), 0) + wire_bytes
                if body == "status":
                    stats.statuses += 1
                    if measure and frame.status.state == cpb.RUN_STATE_RUNNING:
                        newest_status[:] = [frame.status]
                        if not frame.snapshot and now >= measure_from:
                            stats.status_lags.append(now - frame.status.produced_at)
                    stats.last_status_step = frame.status.step
                    mono = time.monotonic()
                    if last_status is not None:
                        stats.max_status_gap_s = max(stats.max_status_gap_s, mono - last_status)
                    last_status = mono
                elif body == "scalars":
                    stats.scalar_frames += 1
                    if measure:
                        _check_scalars(stats, frame, series)
                        scalar_step[0] = max(scalar_step[0], frame.step)
                elif body == "view":
                    stats.views += 1
                    if not frame.snapshot and stats.first_live_view_s is None:
                        stats.first_live_view_s = time.monotonic() - start
                    if measure and (live_only is False or not frame.snapshot):
                        shown_produced_at[:] = [frame.produced_at]
                        stats.arrival_lags.append(now - frame.produced_at)
                        if frame.sent_at:
                            stats.send_lags.append(frame.sent_at - frame.produced_at)
                        if stats.last_view_at and now >= measure_from:
                            stats.view_gaps.append(now - stats.last_view_at)
                        stats.last_view_at = now
                        stats.view_bytes.append(wire_bytes)
                        if json_every and stats.views % json_every == 1:
                            from services.trainer.views import as_json

                            stats.json_bytes.append(len(as_json(frame.view)))
    except TimeoutError:
        pass
    except grpc.aio.AioRpcError as exc:
        stats.error = f"{exc.code().name}: {exc.details()}"
    finally:
        call.cancel()
        if sampler is not None:
            sampler.cancel()
        if acker is not None:
            stats.acks += acker.acks_sent
            await acker.aclose()
    return stats


async def watch_raw(channel: grpc.aio.Channel, run_id: str, duration_s: float, stats: ViewerStats) -> None:
    """A viewer that only counts the bytes it gets (no parsing: viewers' CPU is not the streamer's)."""
    subscribe = channel.unary_stream(
        "/tensorwire.streamer.v1.StreamerService/Subscribe",
        request_serializer=spb.SubscribeRequest.SerializeToString, response_deserializer=len,
    )
    call = subscribe(spb.SubscribeRequest(run_id=run_id, accept_codecs=[cpb.CODEC_DEFLATE]))
    try:
        async with asyncio.timeout(duration_s):
            async for size in call:
                stats.frames += 1
                if size > 1000:
                    stats.views += 1
    except TimeoutError:
        pass
    except grpc.aio.AioRpcError as exc:
        stats.error = f"{exc.code().name}: {exc.details()}"
    finally:
        call.cancel()


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far (from schedstat, ns resolution)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=VIEWER_OPTIONS)


async def watch_target(target: str, run_id: str, duration_s: float, **kwargs: object) -> ViewerStats:
    async with open_channel(target) as channel:
        return await watch(channel, run_id, duration_s, **kwargs)  # type: ignore[arg-type]


async def alternate(
    target: str, trainer_target: str, run_id: str, count: int, pairs: int, slot_s: float,
    trainer_pid: int | None = None,
) -> dict[str, object]:
    """Viewers off for a slot, on for a slot, ``pairs`` times, then off once more
    (``count`` 0: no viewer in the "on" slots either, an A/A control of the method).

    At each slot boundary the trainer's (step, produced_at) is read, so each
    slot's steps/s comes from the trainer's own clock; each "on" slot is
    compared with the mean of the "off" slots around it, which cancels the
    drift of a shared machine. With ``trainer_pid``, steps per CPU-second of
    the trainer process are compared the same way: that ratio shows what the
    trainer's own publishing costs, whatever other tenants of the machine take.
    """
    from tensorwire.trainer.v1 import trainer_pb2 as tpb
    from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc

    stats = ViewerStats()
    others = [ViewerStats() for _ in range(count - 1)]
    channels = [open_channel(target) for _ in range(count)]
    marks: list[tuple[int, float]] = []
    cpu: list[float] = []
    async with grpc.aio.insecure_channel(trainer_target) as tch:
        trainer = tpb_grpc.TrainerServiceStub(tch)
        if run_id == "auto":  # the trainer's demo run
            listed = await trainer.ListRuns(tpb.ListRunsRequest(), timeout=60, wait_for_ready=True)
            run_id = listed.runs[0].run_id

        async def mark() -> None:
            run = (await trainer.GetRun(tpb.GetRunRequest(run_id=run_id), timeout=10)).run
            marks.append((run.step, run.produced_at))
            if trainer_pid:
                cpu.append(cpu_seconds(trainer_pid))

        for slot in range(2 * pairs + 1):
            await mark()
            if slot % 2 and count:
                await asyncio.gather(
                    watch(channels[0], run_id, slot_s, stats=stats, live_only=True),
                    *(watch_raw(ch, run_id, slot_s, st) for ch, st in zip(channels[1:], others)),
                )
            else:
                await asyncio.sleep(slot_s)
        await mark()
    for ch in channels:
        await ch.close()
    rates = [(s1 - s0) / (t1 - t0) for (s0, t0), (s1, t1) in itertools.pairwise(marks) if t1 > t0]
    ratios = _paired(rates)
    cpu_ratios: list[float] = []
    if len(cpu) == len(marks):
        per_cpu = [(s1 - s0) / (c1 - c0) for (s0, _), (s1, _), c0, c1
                   in zip(marks, marks[1:], cpu, cpu[1:]) if c1 > c0]
        cpu_ratios = _paired(per_cpu) if len(per_cpu) == len(rates) else []
    off = rates[0::2]
    on = rates[1::2]
    summary = stats.summary()
    summary.update(
        ratio=statistics.fmean(ratios) if ratios else None,
        ratio_median=statistics.median(ratios) if ratios else None,
        cpu_ratio=statistics.fmean(cpu_ratios) if cpu_ratios else None,
        steps_per_s_off=statistics.fmean(off) if off else None,
        steps_per_s_on=statistics.fmean(on) if on else None,
        viewers_with_views=sum(1 for st in [stats, *others] if st.views),
        viewer_errors=[st.error for st in [stats, *others] if st.error][:3],
    )
    return summary


def _paired(rates: list[float]) -> list[float]:
    """Each odd ("on") slot over the mean of the even ("off") slots beside it."""
    return [rates[i] / ((rates[i - 1] + rates[i + 1]) / 2) for i in range(1, len(rates) - 1, 2)]


async def watch_once(
    target: str, trainer_target: str, run_id: str, duration_s: float, *, ack: bool, plain: bool,
    warmup_s: float = 0.0,
) -> dict[str, object]:
    """One viewer for ``duration_s``; the summary plus every (time, view lag) sample."""
    from tensorwire.trainer.v1 import trainer_pb2 as tpb
    from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc

    if run_id == "auto":
        async with grpc.aio.insecure_channel(trainer_target) as tch:
            listed = await tpb_grpc.TrainerServiceStub(tch).ListRuns(
                tpb.ListRunsRequest(), timeout=60, wait_for_ready=True)
            run_id = listed.runs[0].run_id
    channel = grpc.aio.insecure_channel(target) if plain else open_channel(target)
    async with channel:
        stats = await watch(channel, run_id, duration_s, ack=ack, warmup_s=warmup_s)
    summary: dict[str, object] = dict(stats.summary())
    summary["lag_series"] = [[round(t, 3), round(v, 3)] for t, v in zip(stats.lag_times, stats.lags)]
    summary["started_at"] = time.time() - duration_s
    summary["duration_s"] = duration_s
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--trainer", required=True, help="trainer address (for GetRun)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--slot-s", type=float, default=2.0)
    parser.add_argument("--trainer-pid", type=int, default=0)
    parser.add_argument("--watch-s", type=float, default=0.0,
                        help="one viewer for this long instead of alternating slots")
    parser.add_argument("--no-ack", action="store_true", help="send no Ack (an old client)")
    parser.add_argument("--plain-channel", action="store_true",
                        help="gRPC's default channel settings (BDP probing on)")
    parser.add_argument("--warmup-s", type=float, default=0.0, help="--watch-s: lags measured after this")
    args = parser.parse_args(argv)
    if args.watch_s:
        summary = asyncio.run(watch_once(args.target, args.trainer, args.run_id, args.watch_s,
                                         ack=not args.no_ack, plain=args.plain_channel,
                                         warmup_s=args.warmup_s))
        print(json.dumps(summary), flush=True)
        return 0
    summary = asyncio.run(
        alternate(args.target, args.trainer, args.run_id, args.count, args.pairs, args.slot_s,
                  args.trainer_pid or None)
    )
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
