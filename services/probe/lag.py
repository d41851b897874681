"""LagProbe: subscribe to every running run on every streamer replica, like a viewer.

For each (replica, run) it keeps one ``Subscribe`` stream asking for no view (only
status and scalars, so the trainer builds nothing extra for it) and exports

- ``tensorwire_probe_subscriber_lag_seconds{streamer, run_id}``: at scrape time, how
  old the newest status this subscriber received is (now - the trainer's
  ``produced_at``); +Inf while the replica has sent no status of the run at all
  (the trainer does not publish there), 0 while the run is not running;
- ``tensorwire_probe_frames_total{streamer}`` and
  ``tensorwire_probe_subscribe_errors_total{streamer, code}``.

It sees what a viewer of that replica sees, end to end (trainer -> streamer ->
subscriber), so a replica the trainer stopped publishing to shows up at once.
Lag compares the trainer's wall clock with this process's (NTP-synchronised in a
cluster). The streams are owned tasks, cancelled and awaited by ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

import grpc
from prometheus_client import Counter, Gauge

from tensorwire.calls.backoff import Backoff
from tensorwire.calls.channels import ChannelPool, resolve_targets
from tensorwire.calls.periodic import Periodic
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.errors import TensorwireError
from tensorwire.rpc.auth import ClientSecurity
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.streamer.v1 import streamer_pb2_grpc as spb_grpc
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc

log = logging.getLogger(__name__)

LAG = Gauge(
    "tensorwire_probe_subscriber_lag_seconds",
    "Age of the newest run status a subscriber of this streamer replica received "
    "(+Inf: none yet; 0: run not running).",
    ["streamer", "run_id"],
)
FRAMES = Counter("tensorwire_probe_frames_total", "Frames the probe received.", ["streamer"])
ERRORS = Counter(
    "tensorwire_probe_subscribe_errors_total", "Probe Subscribe streams that failed.",
    ["streamer", "code"],
)
NO_VIEWS = ("probe-none",)
"""A view kind no task has: the stream carries status and scalars only."""


class _Watch:
    """One subscription's latest status."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.produced_at = 0.0
        self.running = True
        self._clock = clock

    def lag_s(self) -> float:
        if not self.running:
            return 0.0
        if self.produced_at <= 0:
            return math.inf
        return max(0.0, self._clock() - self.produced_at)


class LagProbe:
    """Keeps one subscription per (streamer address, running run)."""

    def __init__(self, trainer_target: str, streamer_target: str, *, interval_s: float = 5.0,
                 clock: Callable[[], float] = time.time,
                 security: ClientSecurity | None = None) -> None:
        self.security = security
        self.trainer_target = trainer_target
        self.streamer_target = streamer_target
        self.interval_s = interval_s
        self._clock = clock
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._watches: dict[tuple[str, str], _Watch] = {}
        self._trainer = ChannelPool(trainer_target, name="probe-trainer", security=security)
        self._streamers: dict[str, ChannelPool] = {}
        """One pool per streamer replica: a viewer of each replica, not of the Service."""
        self._loop: Periodic | None = None

    def lag_s(self, address: str, run_id: str) -> float:
        return self._watches[(address, run_id)].lag_s()

    def start(self) -> None:
        self._loop = Periodic(self.refresh, self.interval_s, name="lag-probe refresh",
                              immediately=True, quiet=(grpc.aio.AioRpcError, TensorwireError)).start()

    async def refresh(self) -> None:
        """Look up running runs and replicas; start and stop subscriptions to match."""
        async with self._trainer.acquire() as channel:
            reply = await tpb_grpc.TrainerServiceStub(channel).ListRuns(
                tpb.ListRunsRequest(), timeout=10
            )
        runs = {r.run_id for r in reply.runs if r.state == cpb.RUN_STATE_RUNNING}
        addresses = await asyncio.to_thread(resolve_targets, self.streamer_target)
        wanted = {(a, r) for a in addresses for r in runs}
        for key in list(self._tasks):
            if key not in wanted:
                await self._stop(key)
        for key in wanted - self._tasks.keys():
            watch = _Watch(self._clock)
            self._watches[key] = watch
            LAG.labels(*key).set_function(watch.lag_s)
            self._tasks[key] = asyncio.get_running_loop().create_task(
                self._watch(key, watch), name=f"probe {key[0]} {key[1]}"
            )

    async def _stop(self, key: tuple[str, str]) -> None:
        task = self._tasks.pop(key)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._watches.pop(key, None)
        with contextlib.suppress(KeyError):
            LAG.remove(*key)

    async def _watch(self, key: tuple[str, str], watch: _Watch) -> None:
        address, run_id = key
        pool = self._streamers.get(address)
        if pool is None:
            pool = self._streamers[address] = ChannelPool(address, name=f"probe-{address}",
                                                                  security=self.security)
        backoff, failures = Backoff(initial_s=0.5, max_s=10.0), 0
        while True:
            try:
                async with pool.acquire() as channel:
                    stream = spb_grpc.StreamerServiceStub(channel).Subscribe(
                        spb.SubscribeRequest(run_id=run_id, views=NO_VIEWS, max_fps=1)
                    )
                    async for frame in stream:
                        FRAMES.labels(address).inc()
                        failures = 0
                        if frame.WhichOneof("body") == "status" and frame.status.run_id == run_id:
                            watch.running = frame.status.state in (
                                cpb.RUN_STATE_RUNNING, cpb.RUN_STATE_UNSPECIFIED)
                            watch.produced_at = max(watch.produced_at, frame.status.produced_at)
            except grpc.aio.AioRpcError as exc:
                ERRORS.labels(address, exc.code().name).inc()
                log.info("probe stream %s %s ended: %s", address, run_id, exc.code().name)
            failures += 1
            await backoff.sleep(failures)

    async def aclose(self) -> None:
        if self._loop is not None:
            await self._loop.aclose()
        for key in list(self._tasks):
            await self._stop(key)
        await asyncio.gather(self._trainer.aclose(), *(p.aclose() for p in self._streamers.values()))
