"""Prometheus metrics of the inference core, read from the live objects at scrape time.

Batcher metrics per model version (batches, requests, size- vs timeout-dispatch,
rejected, average batch size, efficiency, queue depth, size limit) and the
async loader's (loads, failures, timeouts, average load time, queue depth).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .repository import ModelRepository


class InferenceCollector:
    """One collector per process; repositories register themselves with it."""

    def __init__(self) -> None:
        self._repositories: weakref.WeakSet[ModelRepository] = weakref.WeakSet()

    def add(self, repository: ModelRepository) -> None:
        self._repositories.add(repository)

    def discard(self, repository: ModelRepository) -> None:
        self._repositories.discard(repository)

    def describe(self) -> list[Metric]:
        return []  # collected lazily; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        counters = {
            "batches": CounterMetricFamily("tensorwire_inference_batches", "Batched forwards run.", labels=labels),
            "requests": CounterMetricFamily("tensorwire_inference_batched_requests", "Requests run in batches.", labels=labels),
            "size_dispatches": CounterMetricFamily("tensorwire_inference_size_dispatches", "Batches cut because they were full.", labels=labels),
            "timeout_dispatches": CounterMetricFamily("tensorwire_inference_timeout_dispatches", "Batches cut when the queue delay ran out or the queue emptied.", labels=labels),
            "rejected": CounterMetricFamily("tensorwire_inference_rejected", "Requests refused with RESOURCE_EXHAUSTED (queue full).", labels=labels),
            "failed": CounterMetricFamily("tensorwire_inference_failed", "Requests whose forward raised.", labels=labels),
        }
        gauges = {
            "average_batch_size": GaugeMetricFamily("tensorwire_inference_average_batch_size", "Requests per batch so far.", labels=labels),
            "efficiency": GaugeMetricFamily("tensorwire_inference_batch_efficiency", "Mean batch fill relative to the size limit (0..1).", labels=labels),
            "queue_depth": GaugeMetricFamily("tensorwire_inference_queue_depth", "Requests waiting for a batch.", labels=labels),
            "limit": GaugeMetricFamily("tensorwire_inference_batch_size_limit", "Current batch size limit (adaptive).", labels=labels),
        }
        loads = CounterMetricFamily("tensorwire_inference_model_loads", "Model version loads, by outcome.", labels=["outcome"])
        load_time = GaugeMetricFamily("tensorwire_inference_model_load_seconds_average", "Average model load time.")
        load_queue = GaugeMetricFamily("tensorwire_inference_model_load_queue_depth", "Loads waiting for a loader slot.")
        outcomes = {"success": 0, "failure": 0, "timeout": 0}
        total_time = 0.0
        done = 0
        depth = 0
        for repository in list(self._repositories):
            for model, version, batcher in repository.batchers():
                m = batcher.metrics
                key = [model, str(version)]
                for name in counters:
                    counters[name].add_metric(key, getattr(m, name))
                gauges["average_batch_size"].add_metric(key, m.average_batch_size)
                gauges["efficiency"].add_metric(key, m.efficiency)
                gauges["queue_depth"].add_metric(key, batcher.queue_depth)
                gauges["limit"].add_metric(key, batcher.batch_size_limit)
            lm = repository.loader.metrics
            outcomes["success"] += lm.successes
            outcomes["failure"] += lm.failures - lm.timeouts
            outcomes["timeout"] += lm.timeouts
            total_time += lm.total_load_time_s
            done += lm.successes + lm.failures
            depth += lm.queue_depth
        for outcome, count in outcomes.items():
            loads.add_metric([outcome], count)
        load_time.add_metric([], total_time / done if done else 0.0)
        load_queue.add_metric([], depth)
        yield from counters.values()
        yield from gauges.values()
        yield from (loads, load_time, load_queue)


COLLECTOR = InferenceCollector()
REGISTRY.register(COLLECTOR)  # type: ignore[arg-type]
