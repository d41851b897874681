"""services.inference.native.NativeHooks.run_batch with the response cache: the keys the
native frontend computed are used only for the config they were computed for."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from services.inference import cached
from services.inference.native import NativeHooks
from services.inference.repository import ModelRepository, RepositoryOptions
from services.inference.version import ModelVersion
from tensorwire.data.tensors import Tensor
from tensorwire.serving import modelrepo
from tensorwire.serving.cache import HitRate, LocalCache
from tensorwire.serving.models import build_model


@contextlib.asynccontextmanager
async def cached_spiral(root: Path) -> AsyncIterator[tuple[NativeHooks, ModelVersion, LocalCache]]:
    """A repository serving ``spiral`` through a local cache, and the native frontend's hooks."""
    modelrepo.write_version(root, "spiral", "spiral", build_model("spiral").state_dict(),
                            config_overrides={"response_cache": {"enable": True}})
    cache = LocalCache(1 << 20)
    repository = ModelRepository(root, RepositoryOptions(cache=cache))
    await repository.start()
    try:
        yield NativeHooks(repository, None, "test"), repository.version_of("spiral", "1"), cache
    finally:
        await repository.aclose()


async def test_keys_of_a_config_reloaded_since_are_dropped_and_computed_again(tmp_path: Path) -> None:
    """A batch queued before its version was reloaded (same number, another config) runs
    on the new model: stored under the keys the frontend computed for the old config, its
    answers would be found by replicas still serving that config (a shared Redis)."""
    async with cached_spiral(tmp_path) as (hooks, mv, cache):
        fingerprint = mv.cache_keys.parts[2]

        def batch(point: list[float], key: bytes, made_for: str) -> None:
            column = np.array([point], np.float32)
            hooks.run_batch("spiral", "1", [column], np.zeros(1), False, [1], None, None, [key], False,
                            False, made_for)

        def stored(key: bytes) -> bool:
            return cache.store.get_many([key])[0] is not None

        right = mv.cache_keys.key([Tensor("points", "FP32", np.array([[0.5, 0.25]], np.float32))])
        await asyncio.to_thread(batch, [0.5, 0.25], b"stale key 16 byt", "an older config")
        assert stored(right) and not stored(b"stale key 16 byt")  # computed again from the columns
        given = b"frontend key 16b"  # the frontend's keys, for this config: used as they are
        await asyncio.to_thread(batch, [0.75, 0.5], given, fingerprint)
        assert stored(given)


async def test_batches_that_skip_the_cache_still_count_the_frontends_lookups_in_the_hit_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While hits are rare, a cheap version's batches but one in ``SAMPLE_EVERY`` skip
    the cache in Python; those the frontend looked up before it learned that (from a
    batch's answer; all missed) count in the hit rate, which its hits always reach:
    else the rate would count every hit against one miss in ``SAMPLE_EVERY``."""
    monkeypatch.setattr(cached, "saving_share", lambda rate: 0.0)
    async with cached_spiral(tmp_path) as (hooks, mv, cache):
        rate = mv.cache_hit_rate
        rate.ratio, rate.racing = 0.04, True  # hits rare
        mv.stats.compute_infer.add(1e-5, 1)  # the forward and what consulting the cache costs: measured
        rate.consult_s = 1e-6
        fingerprint = mv.cache_keys.parts[2]

        def batch(i: int) -> None:
            column = np.array([[i / 10, 0.5]], np.float32)
            _, _, skip = hooks.run_batch("spiral", "1", [column], np.zeros(1), False, [1], None, None,
                                         [b"frontend key %03d" % i], False, True, fingerprint)
            assert skip  # the frontend stops looking the version's requests up

        for i in range(HitRate.SAMPLE_EVERY):
            await asyncio.to_thread(batch, i)
        assert cache.stats.misses == HitRate.SAMPLE_EVERY  # every batch's lookups, skipped or not
        assert rate.ratio == pytest.approx(0.04 * (1 - 1 / HitRate.WINDOW) ** HitRate.SAMPLE_EVERY)
        assert cache.stats.inserts == 0  # the sampled one was a first sighting; the others skipped
        s = mv.stats
        assert (s.cache_miss.count, s.cache_hit.count) == (HitRate.SAMPLE_EVERY, 0)
        assert rate.skipped == HitRate.SAMPLE_EVERY - 1
