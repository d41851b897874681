"""services.inference.native.NativeHooks.run_batch with the response cache: the keys the
native frontend computed are used only for the config they were computed for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from services.inference.native import NativeHooks
from services.inference.repository import ModelRepository, RepositoryOptions
from tensorwire.data.tensors import Tensor
from tensorwire.serving import modelrepo
from tensorwire.serving.cache import LocalCache
from tensorwire.serving.models import build_model


async def test_keys_of_a_config_reloaded_since_are_dropped_and_computed_again(tmp_path: Path) -> None:
    """A batch queued before its version was reloaded (same number, another config) runs
    on the new model: stored under the keys the frontend computed for the old config, its
    answers would be found by replicas still serving that config (a shared Redis)."""
    modelrepo.write_version(tmp_path, "spiral", "spiral", build_model("spiral").state_dict(),
                            config_overrides={"response_cache": {"enable": True}})
    cache = LocalCache(1 << 20)
    repository = ModelRepository(tmp_path, RepositoryOptions(cache=cache))
    await repository.start()
    try:
        hooks = NativeHooks(repository, None, "test")
        mv = repository.version_of("spiral", "1")
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
    finally:
        await repository.aclose()
