"""services.inference.cached: when a request leaves the response cache alone."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from services.inference import cached
from services.inference.stats import VersionStats
from tensorwire.serving.cache import HitRate


def test_a_request_not_sampled_skips_the_cache_when_what_a_lookup_saves_costs_less_than_consulting() -> None:
    version: Any = SimpleNamespace(stats=VersionStats(), cache_hit_rate=HitRate())
    rate = version.cache_hit_rate
    rate.racing, rate.ratio = True, 0.04  # hits rare: a lookup saves 4 % of a forward
    assert not cached._skips(version, sampled=False)  # nothing measured yet: not cheap
    version.stats.compute_infer.add(4 * 150e-6, 4)  # a batch of 4: 150 us a request (4 %: 6 us)
    assert not cached._skips(version, sampled=False)  # consulting not measured yet
    cached._missed(version, 4 * 20e-6, 4, 4)  # a batch of 4 misses, 80 us: 20 us a request
    assert rate.consult_s == 20e-6
    assert cached._skips(version, sampled=False) and cached.skipping(version)
    assert not cached._skips(version, sampled=True)  # the one in SAMPLE_EVERY meets the cache
    rate.racing = False
    assert not cached.skipping(version)  # hits are not rare
    rate.racing = True
    for _ in range(4 * HitRate.WINDOW):  # consulting got cheaper (a recent mean): 5 us a request
        cached._missed(version, 5e-6, 1)
    assert 5e-6 <= rate.consult_s < 6e-6
    assert not cached._skips(version, sampled=False)
    rate.ratio = 0.0  # no hits at all: taken as SKIP_RATE_FLOOR (1.5 us saved), not as nothing saved
    assert cached._skips(version, sampled=False)
    version.stats.compute_infer.add(4 * 10e-3, 4)  # a dearer forward (5 ms a request on average)
    assert not cached._skips(version, sampled=False)
    rate.racing = False
    cached._missed(version, 1.0, 1)  # a lookup-first miss (a Redis round trip...) is not noted
    assert rate.consult_s < 6e-6
