"""The streamer's Prometheus metrics (one place; the hub records, /metrics exports)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)

SUBSCRIBERS = Gauge(
    "tensorwire_streamer_subscribers", "Subscribe streams open, by run.", ["run_id"],
)
FRAMES_SENT = Counter(
    "tensorwire_streamer_frames_sent_total", "Frames handed to subscribers' streams, by kind.",
    ["kind"],
)
FRAMES_SKIPPED = Counter(
    "tensorwire_streamer_frames_skipped_total",
    "Frames a subscriber never got because a newer one replaced them (latest wins), by kind.",
    ["kind"],
)
SENT_BYTES = Counter(
    "tensorwire_streamer_sent_bytes_total", "Frame bytes handed to subscribers' streams, by kind.",
    ["kind"],
)
SEND_LAG = Histogram(
    "tensorwire_streamer_send_lag_seconds",
    "From the trainer producing a step to the streamer sending a frame of it, by kind.",
    ["kind"], buckets=LAG_BUCKETS,
)
ACK_LAG = Histogram(
    "tensorwire_streamer_ack_lag_seconds",
    "From the trainer producing a step to the streamer receiving the subscriber's "
    "acknowledgement of a frame of it (subscribers that send Ack), by kind.",
    ["kind"], buckets=LAG_BUCKETS,
)
DELIVERY_RATE = Histogram(
    "tensorwire_streamer_delivery_rate_bytes_per_second",
    "Delivery rate samples measured from subscribers' acknowledgements.",
    buckets=(1e3, 2e3, 4e3, 8e3, 16e3, 32e3, 64e3, 125e3, 250e3, 500e3, 1e6, 1e7, 1e8),
)
ACKS = Counter(
    "tensorwire_streamer_acks_total",
    "Acks received, by outcome (accepted; future or backwards: ignored).", ["outcome"],
)
HEAVY_HELD = Counter(
    "tensorwire_streamer_views_held_total",
    "Ticks at which a due view waited because too many bytes were in flight, by "
    "feedback (acked: the subscriber's acks; cap: no fresh feedback).", ["feedback"],
)
