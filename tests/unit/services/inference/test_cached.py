"""services.inference.cached: when a request leaves the response cache alone."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from services.inference import cached
from services.inference.stats import VersionStats


def test_only_a_request_not_sampled_of_a_version_measured_cheap_skips_the_cache() -> None:
    version: Any = SimpleNamespace(stats=VersionStats())
    assert not cached._skips(version, sampled=False)  # no forward measured yet: not cheap
    version.stats.compute_infer.add(10 * 50e-6, 10)  # 50 us a request
    assert cached._skips(version, sampled=False)
    assert not cached._skips(version, sampled=True)  # the one in SAMPLE_EVERY meets the cache
    version.stats.compute_infer.add(10 * 1e-3, 10)  # 1 ms a request since: ~525 us on average
    assert not cached._skips(version, sampled=False)
