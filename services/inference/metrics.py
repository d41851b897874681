"""Prometheus metrics of the inference core, read from the live objects at scrape time.

Batcher metrics per model version (batches, requests, size- vs timeout-dispatch,
rejected, efficiency, queue depth, size limit; batch size and queue wait as
histograms), the async loader's (loads, failures, timeouts, queue depth; load time
as a histogram), and
the response cache's: hits, misses and their durations per model version
(Triton's ``nv_cache_num_hits_per_model``, ``nv_cache_num_misses_per_model``,
``nv_cache_hit_duration_per_model``, ``nv_cache_miss_duration_per_model``) and,
labelled by ``cache`` (local or redis), its inserts, evictions, errors, bytes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from tensorwire.rpc.histogram import LOAD_TIME_BUCKETS, Histogram

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
            "requests": CounterMetricFamily(
                "tensorwire_inference_batched_requests", "Requests run in batches.", labels=labels
            ),
            "size_dispatches": CounterMetricFamily(
                "tensorwire_inference_size_dispatches", "Batches cut because they were full.", labels=labels
            ),
            "timeout_dispatches": CounterMetricFamily(
                "tensorwire_inference_timeout_dispatches",
                "Batches cut when the queue delay ran out or the queue emptied.",
                labels=labels,
            ),
            "rejected": CounterMetricFamily(
                "tensorwire_inference_rejected", "Requests refused with RESOURCE_EXHAUSTED (queue full).", labels=labels
            ),
            "failed": CounterMetricFamily(
                "tensorwire_inference_failed", "Requests whose forward raised.", labels=labels
            ),
        }
        gauges = {
            "efficiency": GaugeMetricFamily(
                "tensorwire_inference_batch_efficiency",
                "Mean batch fill relative to the size limit (0..1).",
                labels=labels,
            ),
            "queue_depth": GaugeMetricFamily(
                "tensorwire_inference_queue_depth", "Requests waiting for a batch.", labels=labels
            ),
            "limit": GaugeMetricFamily(
                "tensorwire_inference_batch_size_limit", "Current batch size limit (adaptive).", labels=labels
            ),
        }
        loads = CounterMetricFamily(
            "tensorwire_inference_model_loads", "Model version loads, by outcome.", labels=["outcome"]
        )
        histograms = {
            "batch_sizes": HistogramMetricFamily(
                "tensorwire_inference_batch_size", "Requests per batch.", labels=labels
            ),
            "queue_waits": HistogramMetricFamily(
                "tensorwire_inference_queue_wait_seconds",
                "Time a request waited in the queue for its batch.",
                labels=labels,
            ),
        }
        load_time = HistogramMetricFamily("tensorwire_inference_model_load_seconds", "Model version load time.")
        load_times = Histogram(LOAD_TIME_BUCKETS)
        load_queue = GaugeMetricFamily(
            "tensorwire_inference_model_load_queue_depth", "Loads waiting for a loader slot."
        )
        outcomes = {"success": 0, "failure": 0, "timeout": 0}
        depth = 0
        for repository in list(self._repositories):
            for model, version, batcher in repository.batchers():
                m = batcher.metrics
                key = [model, str(version)]
                for name in counters:
                    counters[name].add_metric(key, getattr(m, name))
                for name, family in histograms.items():
                    h = getattr(m, name)
                    family.add_metric(key, h.cumulative(), h.sum)
                gauges["efficiency"].add_metric(key, m.efficiency)
                gauges["queue_depth"].add_metric(key, batcher.queue_depth)
                gauges["limit"].add_metric(key, batcher.batch_size_limit)
            lm = repository.loader.metrics
            outcomes["success"] += lm.successes
            outcomes["failure"] += lm.failures - lm.timeouts
            outcomes["timeout"] += lm.timeouts
            load_times.counts = [a + b for a, b in zip(load_times.counts, lm.load_times.counts)]
            load_times.sum += lm.load_times.sum
            depth += lm.queue_depth
        for outcome, count in outcomes.items():
            loads.add_metric([outcome], count)
        load_time.add_metric([], load_times.cumulative(), load_times.sum)
        load_queue.add_metric([], depth)
        yield from counters.values()
        yield from gauges.values()
        yield from histograms.values()
        yield from (loads, load_time, load_queue)
        yield from self._cache_metrics()

    def _cache_metrics(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        per_version = {
            "hits": CounterMetricFamily(
                "tensorwire_inference_cache_hits",
                "Requests answered from the response cache (Triton: nv_cache_num_hits_per_model).",
                labels=labels,
            ),
            "misses": CounterMetricFamily(
                "tensorwire_inference_cache_misses",
                "Requests the response cache did not have (Triton: nv_cache_num_misses_per_model).",
                labels=labels,
            ),
            "hit_s": CounterMetricFamily(
                "tensorwire_inference_cache_hit_duration_seconds",
                "Time spent looking up and decoding cache hits.",
                labels=labels,
            ),
            "miss_s": CounterMetricFamily(
                "tensorwire_inference_cache_miss_duration_seconds",
                "Time spent looking up and storing cache misses.",
                labels=labels,
            ),
        }
        cache_label = ["cache"]
        per_cache = {
            "inserts": CounterMetricFamily(
                "tensorwire_inference_cache_inserts", "Answers stored in the response cache.", labels=cache_label
            ),
            "inserted_bytes": CounterMetricFamily(
                "tensorwire_inference_cache_inserted_bytes",
                "Bytes of answers stored in the response cache.",
                labels=cache_label,
            ),
            "evictions": CounterMetricFamily(
                "tensorwire_inference_cache_evictions",
                "Entries evicted from the local cache to make room.",
                labels=cache_label,
            ),
            "errors": CounterMetricFamily(
                "tensorwire_inference_cache_errors",
                "Failed cache commands (the request ran on the model).",
                labels=cache_label,
            ),
            "too_large": CounterMetricFamily(
                "tensorwire_inference_cache_too_large",
                "Answers served but not cached: over the entry size limit.",
                labels=cache_label,
            ),
            "bypassed": CounterMetricFamily(
                "tensorwire_inference_cache_bypassed",
                "Lookups and writes skipped while the cache backend was down.",
                labels=cache_label,
            ),
            "dropped_writes": CounterMetricFamily(
                "tensorwire_inference_cache_dropped_writes",
                "Writes dropped because too many were in flight.",
                labels=cache_label,
            ),
            "commands": CounterMetricFamily(
                "tensorwire_inference_cache_commands",
                "Round trips to the cache backend (Redis: one per batch of lookups or writes).",
                labels=cache_label,
            ),
        }
        held = GaugeMetricFamily(
            "tensorwire_inference_cache_bytes", "Bytes held by the local cache.", labels=cache_label
        )
        entries = GaugeMetricFamily(
            "tensorwire_inference_cache_entries", "Entries held by the local cache.", labels=cache_label
        )
        up = GaugeMetricFamily(
            "tensorwire_inference_cache_up",
            "1 while the cache backend answers, 0 while it is bypassed after errors.",
            labels=cache_label,
        )
        for repository in list(self._repositories):
            cache = repository.cache
            if cache is None:
                continue
            for model, version, s in repository.statistics():
                key = [model, str(version)]
                per_version["hits"].add_metric(key, s.cache_hit.count)
                per_version["misses"].add_metric(key, s.cache_miss.count)
                per_version["hit_s"].add_metric(key, s.cache_hit.ns / 1e9)
                per_version["miss_s"].add_metric(key, s.cache_miss.ns / 1e9)
            for name, family in per_cache.items():
                family.add_metric([cache.kind], getattr(cache.stats, name))
            if cache.held_bytes is not None:
                held.add_metric([cache.kind], cache.held_bytes)
                entries.add_metric([cache.kind], cache.entries or 0)
            up.add_metric([cache.kind], 1.0 if cache.up else 0.0)
        yield from per_version.values()
        yield from per_cache.values()
        yield from (held, entries, up)


COLLECTOR = InferenceCollector()
REGISTRY.register(COLLECTOR)
