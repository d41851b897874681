"""Delivery feedback: what a subscriber really received, and what is still in flight.

A finished gRPC write only means that HTTP/2 flow control and the kernel took
the bytes. On a slow link the socket buffers, the HTTP/2 windows of every hop
(a gateway included) and the client's own buffers can hold seconds of frames
that the sender cannot see, so pacing on write completion alone lets "latest
wins" show old data. A subscriber that sends ``Ack`` (the newest frame
sequence number it got, and when) closes the loop:

- every frame sent is recorded (sequence number, size, production time);
- an ack removes the frames up to its sequence number: what remains is exactly
  the bytes in flight at that moment, and the bytes acknowledged between two
  acks over the time between their receive times (the subscriber's own clock:
  ack delays on the way back do not matter) sample the delivery rate (exported
  and returned to the subscriber);
- between acks the estimate drains at the lower of the measured rate and
  ``floor_bytes_per_s``; each ack puts it back on what really arrived, so a
  rate estimate that lags a link getting slower misjudges one ack interval at
  most.

A heavy frame goes out only when at most about one frame's worth is in flight
(:meth:`DeliveryWindow.may_send`), so the queue in front of the viewer is never
longer than one frame plus the light frames, whatever the client's settings or
the TCP stack do.

A subscriber that never acks (grpcurl, an old client), or whose acks stopped
for ``stale_s``, is held to a conservative cap instead: its bytes in flight are
estimated by draining at ``floor_bytes_per_s`` (a link assumed no slower than
that), and a heavy frame waits while the estimate exceeds ``cap_bytes``. Sending is never
unbounded.

Plain Python: the clock is passed in; no gRPC.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field


class AckOutcome(enum.Enum):
    """What an ack did (the label of the acks counter)."""

    ACCEPTED = "accepted"
    FUTURE = "future"
    """Its sequence number was never sent: ignored."""
    BACKWARDS = "backwards"
    """Older than an ack already taken: ignored."""


@dataclass(frozen=True)
class FeedbackLimits:
    cap_bytes: int = 6144
    """Bytes in flight (estimated) above which a subscriber without fresh feedback
    gets no heavy frame: 0.75 s at 64 kbit/s."""
    floor_bytes_per_s: float = 6000.0
    """Without fresh feedback, the in-flight estimate drains at least this fast
    (48 kbit/s: below the slowest link the cap is meant to hold to its bound,
    64 kbit/s, so what the accounting misses does not pile up)."""
    stale_s: float = 3.0
    """Feedback older than this no longer counts (the subscriber stopped acking);
    status frames go out every second, so a live subscriber acks more often."""
    slack_bytes: int = 1500
    """With feedback, a heavy frame may go out while this many bytes of light
    frames (status, scalars) are still in flight ..."""
    slack_s: float = 0.2
    """... and no more than this many seconds of them at the measured rate (on a
    32 kbit/s link 1.5 KB is 0.37 s that every status waits behind) ..."""
    min_slack_bytes: int = 640
    """... but never less than this: an ack's answer and a status frame. A rate
    measured while only light frames flowed (a new stream whose trainer has not
    published views yet) is what the streamer sent, not what the link carries: a
    slack scaled by it (~100 bytes) held every view behind the ack answers
    themselves, views stayed held, the rate stayed low, and the first live view
    after a streamer restart came 1.5-2.3 s late. 0.2 s is 640 bytes at 25 kbit/s."""
    frame_overhead_bytes: int = 80
    """Wire bytes of a frame beyond its message: gRPC prefix (5), HTTP/2 DATA
    header (9), TCP/IP (52) and link headers (14). Small frames are mostly that."""
    ack_reply_bytes: int = 300
    """Wire bytes an Ack costs on the slow direction: its answer (HEADERS, DATA,
    trailers, ~160 bytes with TCP/IP) and the TCP ACK and HTTP/2 window update
    its request draws; they share the link with the frames."""
    max_records: int = 1024
    """Frames remembered for acks; older ones count as delivered."""
    startup_bytes_per_s: float = 2000.0
    """The rate light frames are spaced for while a subscriber that acks has no
    measured rate yet (16 kbit/s: a status a second, a scalar frame every 0.7 s). Its
    first acks' answers wait behind whatever is queued on its link, and no rate is
    measured before they come back: spaced for the floor's 48 kbit/s, light frames
    kept a 32 kbit/s link full for 5 s, and every view waited behind them."""

    def __post_init__(self) -> None:
        if self.cap_bytes < 0:
            raise ValueError(f"cap_bytes must be >= 0, got {self.cap_bytes}")
        if not self.floor_bytes_per_s > 0:
            raise ValueError(f"floor_bytes_per_s must be > 0, got {self.floor_bytes_per_s}")
        if not self.stale_s > 0:
            raise ValueError(f"stale_s must be > 0, got {self.stale_s}")
        if not self.slack_s > 0:
            raise ValueError(f"slack_s must be > 0, got {self.slack_s}")
        if self.min_slack_bytes < 0:
            raise ValueError(f"min_slack_bytes must be >= 0, got {self.min_slack_bytes}")
        if self.max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {self.max_records}")


@dataclass(frozen=True)
class AckResult:
    outcome: AckOutcome
    produced_at: list[tuple[str, float]] = field(default_factory=list)
    """(kind, produced_at) of the frames this ack acknowledged (for the lag histogram)."""
    rate_sample: float | None = None
    """Bytes per second delivered between the previous ack and this one, if measurable."""


@dataclass
class _Sent:
    seq: int
    nbytes: int
    kind: str
    produced_at: float
    sent_at: float
    """When it went to the transport (the streamer's clock)."""


class DeliveryWindow:
    """One subscriber's frames in flight, its delivery rate and the heavy-frame gate.

    Sizes count wire bytes: each frame's message plus ``frame_overhead_bytes``,
    and each Ack's answer as ``ack_reply_bytes`` in flight behind the frames
    sent before it.
    """

    RATE_WINDOW_S = 2.0
    """The rate estimate is the largest sample of this much receive time: a link
    the streamer did not fill (views held, nothing to send) gives low samples
    that must not drag the estimate down, as in BBR's max filter."""
    MIN_SAMPLE_S = 0.25
    """Receive-time spans shorter than this give no rate sample: the bytes acknowledged
    accumulate until the span is this long. A subscriber's receive times jitter by
    its scheduling (a busy page or process reads late, then several frames at once);
    over 50 ms spans that jitter made single samples 5-9x a 32 kbit/s link, and the
    max filter kept them. (On a fast link, 0.25 s spans see the streamer's own
    traffic, not the link: the estimate is lower there, which only spaces status and
    scalar frames a little more once it is under ~15 KB/s.)"""

    def __init__(self, limits: FeedbackLimits | None = None, *, expects_acks: bool = False,
                 now: float = 0.0) -> None:
        """:param expects_acks: the subscriber said it will ack (``SubscribeRequest.acks``).
        :param now: when the subscription opened (the wait for its first ack counts from it)."""
        self.limits = limits or FeedbackLimits()
        self.expects_acks = expects_acks
        self._opened_at = now
        self._sent: deque[_Sent] = deque()
        self.last_seq = 0
        """Sequence number of the newest frame sent."""
        self.acked_seq = 0
        self.unacked_bytes = 0
        self.bytes_per_s: float | None = None
        """Delivery rate estimated from acks (None until two acks measured it)."""
        self.last_ack_at: float | None = None
        self._last_received_at: float | None = None
        self._last_sent_at = 0.0  # send time of the newest frame acked at the last sample point
        self._sample_bytes = 0
        self._samples: deque[tuple[float, float]] = deque()  # (received_at, bytes/s)
        self._queued = 0.0
        self._queued_at = 0.0
        self.acks = 0
        self.ignored_acks = 0

    def __repr__(self) -> str:
        rate = f"{self.bytes_per_s:.0f} B/s" if self.bytes_per_s else "unknown rate"
        return (f"<DeliveryWindow sent {self.last_seq}, acked {self.acked_seq}, "
                f"{self.unacked_bytes} B unacked, {rate}, {self.ignored_acks} acks ignored>")

    # -- state ---------------------------------------------------------
    def has_feedback(self, now: float) -> bool:
        """True while the subscriber's acks are fresh."""
        return self.last_ack_at is not None and now - self.last_ack_at <= self.limits.stale_s

    def in_flight(self, now: float, fallback_bytes_per_s: float | None = None) -> float:
        """Estimated bytes sent and not yet delivered, now."""
        if self.has_feedback(now):
            # Between acks, bytes drain at the lower of the measured rate and the floor
            # (each ack puts the estimate back on what really arrived). Not at the
            # measured rate alone: its max filter overshoots, and the queue doubled on
            # a 64 kbit/s link; not at all: then views wait for acks, which lag by the
            # ack interval, and came about once a second at 64 kbit/s.
            rate = min(self.bytes_per_s or 0.0, self.limits.floor_bytes_per_s)
        else:
            rate = self.fallback_rate(fallback_bytes_per_s)
        drained = rate * max(0.0, now - self._queued_at)
        return max(0.0, self._queued - drained)

    def light_rate(self, now: float) -> float | None:
        """The rate light frames are spaced for: the measured one while feedback is
        fresh; for a subscriber that acks but has no measured rate yet, the startup
        rate; None (the base intervals) for one that does not ack."""
        rate = self.bytes_per_s if self.has_feedback(now) else None
        if not rate and self.expects_acks:
            return self.limits.startup_bytes_per_s
        return rate

    def fallback_rate(self, measured_bytes_per_s: float | None = None) -> float:
        """The rate assumed without fresh feedback: the floor.

        (``measured_bytes_per_s``, the write-blocking estimate, is not trusted:
        with the kernel's default buffers writes rarely block, and between blocks
        that estimate creeps up to re-probe the link; draining the cap at it let a
        64 kbit/s subscriber fall 16 s behind.)
        """
        return self.limits.floor_bytes_per_s

    def may_send(self, nbytes: int, now: float, fallback_bytes_per_s: float | None = None) -> bool:
        """May a heavy frame of ``nbytes`` go out now?

        With fresh feedback: when the previous heavy frame arrived and at most
        ``slack_bytes`` (and ``slack_s`` at the measured rate) of light frames and
        ack answers are on their way, so
        this frame is about the only one in flight. Without: when the estimate
        is within the cap. (``nbytes`` is the frame's size, for policies that
        weigh it; these do not.)
        """
        allowance: float
        if self.has_feedback(now):
            allowance = self.limits.slack_bytes
            if self.bytes_per_s:
                allowance = max(min(allowance, self.limits.slack_s * self.bytes_per_s),
                                self.limits.min_slack_bytes)
        elif self.awaiting_first_ack(now):
            # Until the first ack says what arrived, one heavy frame in flight: the cap's
            # worth (drained at the floor's 48 kbit/s) was seconds of queue on a 32 kbit/s
            # link, which every later frame and ack answer then waited behind (a page's
            # first view 10 s old while its acks timed out).
            return not any(record.kind == "view" for record in self._sent)
        else:
            allowance = self.limits.cap_bytes
        return self.in_flight(now, fallback_bytes_per_s) <= allowance

    def awaiting_first_ack(self, now: float) -> bool:
        """True while a subscriber that said it acks has not yet, within ``stale_s``."""
        return (self.expects_acks and self.last_ack_at is None
                and now - self._opened_at <= self.limits.stale_s)

    # -- events --------------------------------------------------------
    def sent(self, nbytes: int, kind: str, produced_at: float, now: float,
             fallback_bytes_per_s: float | None = None) -> int:
        """Record a frame handed to the transport; returns its sequence number."""
        nbytes += self.limits.frame_overhead_bytes
        self._queued = self.in_flight(now, fallback_bytes_per_s) + nbytes
        self._queued_at = now
        self.last_seq += 1
        self._sent.append(_Sent(self.last_seq, nbytes, kind, produced_at, now))
        self.unacked_bytes += nbytes
        if len(self._sent) > self.limits.max_records:
            old = self._sent.popleft()
            self.unacked_bytes -= old.nbytes
            self.acked_seq = max(self.acked_seq, old.seq)
        return self.last_seq

    def ack(self, seq: int, received_at: float, now: float) -> AckResult:
        """The subscriber got every frame up to ``seq`` (at ``received_at``, its clock;
        0 or a non-finite value: unknown, the ack's arrival is used)."""
        if seq > self.last_seq:
            self.ignored_acks += 1
            return AckResult(AckOutcome.FUTURE)
        if seq < self.acked_seq:
            self.ignored_acks += 1
            return AckResult(AckOutcome.BACKWARDS)
        self.acks += 1
        self.last_ack_at = now
        acked_bytes = 0
        produced: list[tuple[str, float]] = []
        sent_at = None
        while self._sent and self._sent[0].seq <= seq:
            record = self._sent.popleft()
            acked_bytes += record.nbytes
            sent_at = record.sent_at if sent_at is None else max(sent_at, record.sent_at)
            if record.kind != "ack":
                produced.append((record.kind, record.produced_at))
        self.unacked_bytes -= acked_bytes
        self.acked_seq = seq
        # this ack's answer goes out behind every frame sent so far
        if self.limits.ack_reply_bytes:
            self._sent.append(_Sent(self.last_seq, self.limits.ack_reply_bytes, "ack", 0.0, now))
            self.unacked_bytes += self.limits.ack_reply_bytes
        self._queued = float(self.unacked_bytes)
        self._queued_at = now
        return AckResult(AckOutcome.ACCEPTED, produced, self._sample_rate(acked_bytes, received_at, sent_at))

    def _sample_rate(self, acked_bytes: int, received_at: float, sent_at: float | None) -> float | None:
        """Bytes acknowledged since the last sample point over the longer of the
        receive-time span and the send-time span of those bytes.

        The send span guards against receive times squeezed together (as BBR's
        rate samples do against ack compression): a subscriber busy elsewhere
        reads frames that waited in its socket all at once, and bytes over that
        squeezed span overestimated a 32 kbit/s link 2-4x (the max filter kept
        the highest of them), so status, scalars and the in-flight drain were
        paced for a link twice as fast. Bytes cannot have arrived faster than
        they were sent, and on a link that queues (the only one where the rate
        matters) they arrive no faster than it delivers.
        """
        if not (math.isfinite(received_at) and received_at > 0):
            return None  # no usable receive time: the rate keeps its estimate
        previous = self._last_received_at
        self._sample_bytes += acked_bytes
        if previous is None or received_at < previous:  # first ack, or the client's clock jumped
            self._last_received_at = received_at
            self._last_sent_at = sent_at or 0.0
            self._sample_bytes = 0
            return None
        span = received_at - previous
        if span < self.MIN_SAMPLE_S:
            return None  # a burst: wait for a longer span
        if sent_at is not None and self._last_sent_at:
            span = max(span, sent_at - self._last_sent_at)
        sample = self._sample_bytes / span
        self._last_received_at = received_at
        if sent_at is not None:
            self._last_sent_at = sent_at
        self._sample_bytes = 0
        if sample > 0:
            samples = self._samples
            while samples and samples[0][0] < received_at - self.RATE_WINDOW_S:
                samples.popleft()
            samples.append((received_at, sample))
            self.bytes_per_s = max(rate for _, rate in samples)
        return sample
