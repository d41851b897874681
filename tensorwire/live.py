"""Delivery feedback for a live subscription, client side: ``FrameAcker``, and
``HeldArrays`` for a subscription that asked for ``reuse_arrays``.

A ``Subscribe`` stream's frames carry sequence numbers (``Frame.seq``; the
first frame also ``Frame.subscription_id``). Telling the streamer what arrived,
with ``StreamerService/Ack``, lets it keep at most about one heavy frame in
flight to this subscriber, so the view on screen stays fresh on a slow link
whatever this client's HTTP/2 window or the TCP buffers would otherwise hold
(services/streamer/feedback.py has the streamer's side).

Subscribe with ``SubscribeRequest.acks`` set when acking: until the first ack the
streamer then keeps one view in flight, not its no-feedback cap's worth.

The policy (the browser client in clients/web/src/rpc.ts does the same): a
view is acknowledged at once; other frames at most every ``interval_s``; each
ack names the newest frame received. An ack's answer comes back on the slow
direction, behind the frames, so acks do not wait for answers (at most
``max_outstanding`` at once; the streamer ignores one that arrives after a
newer one). Each answer carries
the streamer's clock, so the acker also estimates the clock offset:
``server_time()``. A round trip's midpoint (NTP) is biased on a link whose two
directions differ (a slow download: the answer waits behind frames), so it
uses bounds instead: the streamer answered an ack after it left and before
its answer came back, and a frame arrived after the streamer stamped it
(``sent_at``); the offset lies between the tightest lower and upper bound of
all of them (each tight on a fast direction), the estimate is the middle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable

import grpc

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.rpc.rpcnames import method_path
from tensorwire.streamer.v1 import streamer_pb2 as spb

log = logging.getLogger(__name__)



class HeldArrays:
    """The arrays of the last view of each name on one ``Subscribe`` stream.

    A subscriber that sets ``SubscribeRequest.reuse_arrays`` gets an array that
    did not change since the last view of the same name (a task's dataset) as
    ``Array(name=..., unchanged=True)`` without its bytes; :meth:`fill` puts the
    held array back, so the view is whole again. One per stream: a new
    subscription starts empty on both sides.
    """

    def __init__(self) -> None:
        self._views: dict[str, dict[str, cpb.Array]] = {}

    def fill(self, frame: spb.Frame) -> None:
        """Complete ``frame``'s view in place (other frames pass unchanged).

        Raises ValueError when an array is named unchanged that this stream never
        carried (a streamer bug: the view cannot be shown).
        """
        if not frame.HasField("view"):
            return
        view = frame.view
        key = view.name or view.kind
        held = self._views.get(key, {})
        for i, array in enumerate(view.arrays):
            if array.unchanged:
                kept = held.get(array.name)
                if kept is None:
                    raise ValueError(f"view {key}: array {array.name!r} is named unchanged but was never sent")
                view.arrays[i].CopyFrom(kept)
        self._views[key] = {a.name: a for a in view.arrays}


ACK_METHOD = method_path(spb, "StreamerService", "Ack")


class FrameAcker:
    """Acknowledges one subscription's frames; call :meth:`received` for each frame."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        run_id: str,
        *,
        interval_s: float = 0.5,
        timeout_s: float = 5.0,
        max_outstanding: int = 8,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._call = channel.unary_unary(
            ACK_METHOD, request_serializer=spb.AckRequest.SerializeToString,
            response_deserializer=spb.AckResponse.FromString,
        )
        self.run_id = run_id
        self.interval_s = interval_s
        self._slots = asyncio.Semaphore(max_outstanding)
        self._calls: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.timeout_s = timeout_s
        self._wall = wall
        self.subscription_id = ""
        self._seq = 0
        self._received_at = 0.0
        self._acked_seq = 0
        self._last_sent = -math.inf
        self._due = asyncio.Event()
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._low: deque[float] = deque(maxlen=64)  # streamer minus this clock: lower bounds
        self._high: deque[float] = deque(maxlen=64)  # ... and upper bounds
        self.acks_sent = 0
        self.errors = 0
        self.last_reply: spb.AckResponse | None = None

    def __repr__(self) -> str:
        return (f"<FrameAcker {self.subscription_id or 'no id yet'}: received {self._seq}, "
                f"acked {self._acked_seq}, {self.acks_sent} acks, {self.errors} errors>")

    @property
    def clock_offset_s(self) -> float | None:
        """Streamer clock minus this clock (None until a frame or an ack measured it)."""
        if not self._low:
            return None
        low = max(self._low)
        return (low + min(self._high, default=low)) / 2

    def server_time(self) -> float:
        """Now on the streamer's clock (this clock when no ack has measured the offset)."""
        return self._wall() + (self.clock_offset_s or 0.0)

    def received(self, frame: spb.Frame, received_at: float | None = None) -> None:
        """Note a frame that arrived (cheap; the ack goes out from a background task)."""
        if frame.subscription_id:
            self.subscription_id = frame.subscription_id
        if frame.sent_at:
            # stamped before it arrived: streamer - this clock >= sent_at - arrival
            self._low.append(frame.sent_at - (self._wall() if received_at is None else received_at))
        if not frame.seq or not self.subscription_id or self._stopped:
            return  # a streamer without feedback: nothing to acknowledge
        self._seq = frame.seq
        self._received_at = self._wall() if received_at is None else received_at
        self._due.set()
        if frame.HasField("view"):
            self._urgent.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"ack {self.subscription_id}")

    async def aclose(self) -> None:
        tasks = [*self._calls, *([self._task] if self._task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopped:
            await self._due.wait()
            delay = self._last_sent + self.interval_s - loop.time()
            if delay > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._urgent.wait()
            await self._slots.acquire()
            if self._stopped:
                self._slots.release()
                return
            self._due.clear()
            self._urgent.clear()
            self._last_sent = loop.time()
            request = spb.AckRequest(
                subscription_id=self.subscription_id, run_id=self.run_id, seq=self._seq,
                received_at=self._received_at,
            )
            call = asyncio.create_task(self._send(request))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _send(self, request: spb.AckRequest) -> None:
        try:
            sent = self._wall()
            try:
                reply = await self._call(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                self.errors += 1
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    log.info("acks for %s stop: %s: %s", self.subscription_id, exc.code().name, exc.details())
                    self._stopped = True  # the subscription ended, or this streamer takes no acks
                    self._due.set()
                return
            back = self._wall()
            seq = request.seq
            self.acks_sent += 1
            self._acked_seq = max(self._acked_seq, seq)
            self.last_reply = reply
            if reply.server_time > 0:
                # answered after the ack left and before the answer came back
                self._high.append(reply.server_time - sent)
                self._low.append(reply.server_time - back)
        finally:
            self._slots.release()
