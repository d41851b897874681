"""services.inference.cached: when a request leaves the response cache alone."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from services.inference import cached
from services.inference.stats import VersionStats
from tensorwire.serving.cache import HitRate


def test_a_request_not_sampled_skips_the_cache_when_a_tenth_of_a_forward_costs_less_than_consulting() -> None:
    version: Any = SimpleNamespace(stats=VersionStats(), cache_hit_rate=HitRate())
    stats = version.stats
    assert not cached._skips(version, sampled=False)  # nothing measured yet: not cheap
    stats.compute_infer.add(10 * 150e-6, 10)  # 150 us a request (a tenth: 15 us)
    assert not cached._skips(version, sampled=False)  # no consulted miss measured yet
    stats.cache_miss.add(10 * 20e-6, 10)  # consulting cost 20 us a request
    assert cached._skips(version, sampled=False)
    assert not cached._skips(version, sampled=True)  # the one in SAMPLE_EVERY meets the cache
    stats.cache_miss.add(0.0, 90)  # 90 skipped requests, counted as misses that took no time:
    version.cache_hit_rate.skipped = 90  # what consulting costs is measured on the others only
    assert cached._skips(version, sampled=False)
    stats.compute_infer.add(10 * 500e-6, 10)  # dearer since: 325 us a request on average
    assert not cached._skips(version, sampled=False)
