"""The trainer's Prometheus metrics (one place; the publisher and checkpoint writer record)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RUNS_ACTIVE = Gauge(
    "tensorwire_trainer_runs_active", "Training runs not finished (running or paused).",
)
STEPS = Counter(
    "tensorwire_trainer_steps_total",
    "Training steps taken, by run (rate() of it: steps/s per run).", ["run_id"],
)
CHECKPOINTS = Counter(
    "tensorwire_trainer_checkpoints_total",
    "Checkpoint writes into the model repository, by outcome (written, failed).", ["outcome"],
)
PUBLISH_QUEUE = Gauge(
    "tensorwire_trainer_publish_queue_depth",
    "Updates waiting in a streamer link's outbox (statuses, views, runs with scalars), "
    "by streamer address.", ["streamer"],
)
PUBLISH_RECONNECTS = Counter(
    "tensorwire_trainer_publish_reconnects_total",
    "Publish streams opened again after a streamer link failed, by streamer address.",
    ["streamer"],
)
