"""tensorwire.serving.cache without a network: Triton's --cache-config, keys, values, the local LRU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.inference.__main__ import main as inference_main
from services.inference.settings import InferenceSettings
from tensorwire.data.tensors import Tensor
from tensorwire.errors import InvalidArgumentError
from tensorwire.rpc import config
from tensorwire.serving import modelrepo
from tensorwire.serving.cache import (
    ENTRY_OVERHEAD_BYTES,
    LocalCache,
    LocalCacheConfig,
    RedisCacheConfig,
    RequestKeys,
    decode_tensors,
    decode_values,
    encode_requests,
    encode_tensors,
    parse_cache_config,
)

try:
    from services.inference import _native  # type: ignore[attr-defined]
except ImportError:  # not built: only the Python store is tested
    _native = None

STORES = ["python", pytest.param("native", marks=pytest.mark.skipif(_native is None, reason="native not built"))]


def local_cache(store: str, size_bytes: int, max_entry_bytes: int | None = None) -> LocalCache:
    """A LocalCache with its entries in Python's store or the native frontend's."""
    cache = LocalCache(size_bytes, max_entry_bytes)
    if store == "native":
        cache.use_store(_native.LruStore(size_bytes, ENTRY_OVERHEAD_BYTES))
    return cache

# -- --cache-config -----------------------------------------------------------------------


def test_no_flag_is_no_cache() -> None:
    assert parse_cache_config([]) is None
    assert config.load(InferenceSettings, [], env={}).cache_config is None


def test_local_and_redis_in_triton_form() -> None:
    assert parse_cache_config(["local,size=1048576"]) == LocalCacheConfig(1048576, 1048576)
    assert parse_cache_config(["local,size=1000", "local,max_entry_size=100"]) == LocalCacheConfig(1000, 100)
    redis = parse_cache_config([
        "redis,host=cache.svc", "redis,port=6380", "redis,password=p,a=ss", "redis,db=2", "redis,ttl=30",
        "redis,tls_enabled=true", "redis,cacert=/ca.pem", "redis,socket_timeout=100",
    ])
    assert redis == RedisCacheConfig(
        host="cache.svc", port=6380, password="p,a=ss", db=2, ttl_s=30, tls_enabled=True,
        cacert="/ca.pem", socket_timeout_s=0.1,
    )
    assert "p,a=ss" not in repr(redis)  # the start-up log prints the settings


def test_flags_repeat_and_the_environment_separates_with_semicolons() -> None:
    by_flag = config.load(
        InferenceSettings, ["--cache-config", "redis,host=r", "--cache-config", "redis,port=7000"], env={}
    )
    by_env = config.load(
        InferenceSettings, [], env={"TENSORWIRE_INFERENCE_CACHE_CONFIG": "redis,host=r; redis,port=7000"}
    )
    assert by_flag.cache_config == by_env.cache_config == RedisCacheConfig(host="r", port=7000)
    # a flag wins over the environment, as for every setting
    both = config.load(InferenceSettings, ["--cache-config", "local,size=10"],
                       env={"TENSORWIRE_INFERENCE_CACHE_CONFIG": "redis,host=r"})
    assert isinstance(both.cache_config, LocalCacheConfig)


@pytest.mark.parametrize(("entries", "message"), [
    (["local,sise=10"], r"unknown key 'sise' for the local cache in 'local,sise=10'; known: size"),
    (["local,size=big"], r"size must be a whole number, got 'big' \(in 'local,size=big'\)"),
    (["local,size=-5"], r"size must be > 0, got -5"),
    (["local,size=0"], r"size must be > 0, got 0"),
    (["local"], r"'local' is not <cache>,<key>=<value>"),
    (["local,size"], r"'local,size' is not <cache>,<key>=<value>"),
    (["memcached,size=1"], r"unknown cache 'memcached'"),
    (["local,size=1", "redis,host=h"], r"both local and redis are configured"),
    (["local,size=1", "local,size=2"], r"key 'size' of the local cache is given twice"),
    (["local,max_entry_size=10"], r"the local cache needs its size"),
    (["redis,port=6379"], r"the redis cache needs its host"),
    (["redis,host=h", "redis,port=70000"], r"port must be <= 65535, got 70000"),
    (["redis,host=h", "redis,tls_enabled=maybe"], r"tls_enabled must be true or false, got 'maybe'"),
    (["redis,host=h", "redis,ttl=soon"], r"ttl must be a whole number, got 'soon'"),
])
def test_bad_entries_are_named(entries: list[str], message: str) -> None:
    argv = [arg for entry in entries for arg in ("--cache-config", entry)]
    with pytest.raises(config.SettingsError, match=r"^cache_config \(--cache-config\): " + message):
        config.load(InferenceSettings, argv, env={})


def test_a_bad_entry_stops_the_service_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert inference_main(["--cache-config", "local,size=lots"]) == 2
    assert "cache_config (--cache-config): size must be a whole number, got 'lots'" in capsys.readouterr().out


def test_model_config_opt_in_is_validated() -> None:
    base = modelrepo.default_config("m", "spiral")
    assert not modelrepo.response_cache_enabled(modelrepo.validate_config(base))
    on = modelrepo.validate_config({**base, "response_cache": {"enable": True}})
    assert modelrepo.response_cache_enabled(on)
    for bad in ({"enable": "yes"}, {"enabled": True}, True):
        with pytest.raises(InvalidArgumentError, match=r'response_cache must be \{"enable": true\|false\}'):
            modelrepo.validate_config({**base, "response_cache": bad})


# -- keys -----------------------------------------------------------------------------------


def _t(name: str, array: np.ndarray, datatype: str = "FP32") -> Tensor:
    return Tensor(name, datatype, array)


def test_a_key_covers_model_version_inputs_and_outputs() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    keys = RequestKeys("spiral", 1, "fp")
    base = keys.key([_t("points", x)])
    assert len(base) == 16
    assert keys.key([_t("points", x.copy())]) == base  # equal requests, equal keys
    different = {
        "version": RequestKeys("spiral", 2, "fp").key([_t("points", x)]),
        "model": RequestKeys("spiral2", 1, "fp").key([_t("points", x)]),
        "fingerprint": RequestKeys("spiral", 1, "other").key([_t("points", x)]),
        "bytes": keys.key([_t("points", x + 1)]),
        "shape": keys.key([_t("points", x.reshape(2, 3))]),
        "datatype": keys.key([_t("points", x.view(np.int32), "INT32")]),
        "name": keys.key([_t("pointz", x)]),
        "outputs": keys.key([_t("points", x)], ("logits",)),
        "split between parts": RequestKeys("spiral", 11, "fp").key([_t("points", x)]),
    }
    assert base not in different.values()
    assert len(set(different.values())) == len(different)
    # a non-contiguous view hashes as its values
    wide = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert keys.key([_t("points", wide[:, ::2])]) == keys.key([_t("points", np.ascontiguousarray(wide[:, ::2]))])
    texts = np.array([b"ab", b"c"], dtype=object)
    assert keys.key([_t("t", texts, "BYTES")]) != keys.key([_t("t", np.array([b"a", b"bc"], dtype=object), "BYTES")])


def test_a_key_does_not_depend_on_the_order_inputs_are_listed_in() -> None:
    """The native frontend hands inputs over in the config's order, a client may list
    them in any: both frontends must compute one key for one request."""
    keys = RequestKeys("pair", 1, "fp")
    a, b = _t("a", np.zeros((1, 2), np.float32)), _t("b", np.ones((1, 3), np.float32))
    assert keys.key([a, b]) == keys.key([b, a])
    assert keys.key([a, b]) != keys.key([_t("a", b.array), _t("b", a.array)])  # names still bind bytes


def test_a_native_batchs_keys_and_values_are_those_of_its_requests() -> None:
    """The native frontend keys and encodes a batch's requests from its columns at once:
    the same keys and values as the Python path computes request by request."""
    keys = RequestKeys("pair", 1, "fp")
    rng = np.random.default_rng(3)
    rows = [1, 3, 1, 2]
    bounds = [0, 1, 4, 5, 7]
    b = rng.random((7, 3), dtype=np.float32)  # the config lists b first: keys sort by name
    a = rng.integers(0, 9, (7, 2, 2)).astype(np.int64)
    outputs = [(), ("y",), ("y", "x"), ()]
    batch = keys.batch_keys([("b", "FP32"), ("a", "INT64")], [b, a], bounds, outputs)
    one_by_one = [keys.key([_t("b", b[s:e]), _t("a", a[s:e], "INT64")], out)
                  for s, e, out in zip(bounds, bounds[1:], outputs)]
    assert batch == one_by_one and len(set(batch)) == len(rows)
    x, y = rng.random((7, 2), dtype=np.float32), np.arange(7, dtype=np.int32)
    values = encode_requests([("x", "FP32", x), ("y", "INT32", y)], bounds, [3, 0, 1, 2])
    assert values == [encode_tensors([_t("x", x[s:e]), _t("y", y[s:e], "INT32")])
                      for s, e in (bounds[3:5], bounds[0:2], bounds[1:3], bounds[2:4])]


def test_a_native_batchs_hits_are_decoded_in_groups_laid_out_alike() -> None:
    """decode_values: values with the same names, datatypes and shapes form one group
    whose arrays are the members' rows one after the other; others get groups of their
    own; unreadable values are reported, not raised."""
    rng = np.random.default_rng(4)
    x, y = rng.random((5, 2), dtype=np.float32), np.arange(5, dtype=np.int32)
    one_row = encode_requests([("x", "FP32", x), ("y", "INT32", y)], [0, 1, 2, 3, 4, 5], range(5))
    two_rows = encode_tensors([_t("x", x[:2])])  # another layout: 2 rows, x only
    texts = encode_tensors([Tensor("t", "BYTES", np.array([b"a", b"bc"], dtype=object))])
    values = [one_row[4], two_rows, one_row[0], b"\x09junk", texts, one_row[2]]
    groups, failed = decode_values(values)
    assert [i for i, _ in failed] == [3]
    by_members = {tuple(g.members): g.tensors for g in groups}
    assert set(by_members) == {(0, 2, 5), (1,), (4,)}
    (xn, xd, xs), (yn, yd, ys) = by_members[(0, 2, 5)]
    assert (xn, xd, yn, yd) == ("x", "FP32", "y", "INT32")
    assert np.array_equal(xs, x[[4, 0, 2]]) and np.array_equal(ys, y[[4, 0, 2]])
    assert [(n, a.shape) for n, _, a in by_members[(1,)]] == [("x", (2, 2))]
    assert by_members[(4,)][0][2].tolist() == [b"a", b"bc"]
    # A value of the same length and layout but other shapes is not taken for one of the group.
    other = encode_tensors([_t("x", x[:1].reshape(2, 1)), _t("y", y[:1], "INT32")])
    assert len(other) == len(one_row[0])
    groups, _ = decode_values([one_row[0], other])
    assert sorted(tuple(g.members) for g in groups) == [(0,), (1,)]


@pytest.mark.parametrize("store", STORES)
def test_the_local_cache_serves_other_threads(store: str) -> None:
    """The native frontend's batch threads look up and store directly (one lock)."""
    import asyncio
    import threading

    cache = local_cache(store, 1 << 20)
    loop = asyncio.new_event_loop()  # not running: the local cache never needs it
    keys = [bytes([i]) * 16 for i in range(64)]

    def worker(offset: int) -> None:
        for round_ in range(200):
            key = keys[(offset + round_) % len(keys)]
            if cache.lookup_from_thread([key], loop)[0] is None:
                cache.put_many_from_thread([(key, key * 4)], loop)

    threads = [threading.Thread(target=worker, args=(i * 7,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loop.close()
    assert cache.lookup_from_thread(keys, loop) == [key * 4 for key in keys]
    assert cache.entries == len(keys)
    assert cache.held_bytes == sum(len(k) * 5 + ENTRY_OVERHEAD_BYTES for k in keys)
    assert cache.stats.hits + cache.stats.misses == 4 * 200 + len(keys)


def test_values_round_trip() -> None:
    tensors = [
        _t("logits", np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)),
        _t("ids", np.array([[1], [-2]], dtype=np.int64), "INT64"),
        _t("half", np.ones((2,), dtype=np.float16), "FP16"),
        _t("words", np.array([b"hi", b"", b"there"], dtype=object), "BYTES"),
        _t("scalar", np.array(3.5, dtype=np.float64), "FP64"),
    ]
    decoded = decode_tensors(encode_tensors(tensors))
    assert [(n, d) for n, d, _ in decoded] == [(t.name, t.datatype) for t in tensors]
    for (_, _, array), tensor in zip(decoded, tensors):
        assert array.shape == tensor.array.shape and array.dtype == tensor.array.dtype
        assert array.tolist() == tensor.array.tolist()
    with pytest.raises(ValueError, match="format"):
        decode_tensors(b"\x09\x00\x00")


# -- the local LRU ------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_local_cache_is_a_byte_bounded_lru(store: str) -> None:
    value = bytes(100)
    cost = 16 + 100 + ENTRY_OVERHEAD_BYTES
    cache = local_cache(store, 3 * cost)
    keys = [bytes([i]) * 16 for i in range(5)]
    for key in keys[:3]:
        cache.put(key, value)
    assert (cache.entries, cache.held_bytes) == (3, 3 * cost)
    assert await cache.get(keys[0]) == value  # 0 is now the most recently used
    cache.put(keys[3], value)  # evicts 1, the least recently used
    assert await cache.get(keys[1]) is None
    assert await cache.get(keys[0]) == value
    assert (cache.entries, cache.held_bytes, cache.stats.evictions) == (3, 3 * cost, 1)
    # a bigger entry evicts as many as it needs
    cache.put(keys[4], bytes(100 + cost))
    assert cache.entries == 2 and cache.held_bytes <= cache.size_bytes
    assert cache.stats.evictions == 3  # 2 and 3 went; 0 (used last) stayed
    assert await cache.get(keys[0]) == value
    assert (cache.stats.hits, cache.stats.misses) == (3, 1)
    # re-putting a key replaces it without counting its bytes twice
    held = cache.held_bytes
    cache.put(keys[4], bytes(100 + cost))
    assert cache.held_bytes == held
    assert "2 entries" in repr(cache)


@pytest.mark.parametrize("store", STORES)
def test_a_native_batchs_lookups_count_and_refresh_as_single_ones(store: str) -> None:
    """``lookup_from_thread`` of many keys (one hold of the lock): the same values,
    hit/miss counts and recency as one ``get`` each."""
    import asyncio

    value = bytes(100)
    cost = 16 + 100 + ENTRY_OVERHEAD_BYTES
    cache = local_cache(store, 3 * cost)
    keys = [bytes([i]) * 16 for i in range(4)]
    for k in keys[:3]:
        cache.put(k, value)
    loop = asyncio.new_event_loop()
    try:
        assert cache.lookup_from_thread([keys[3], keys[0], keys[3]], loop) == [None, value, None]
        assert (cache.stats.hits, cache.stats.misses) == (1, 2)
        assert cache.lookup_from_thread([keys[3]], loop) == [None]
    finally:
        loop.close()
    cache.put(keys[3], value)  # evicts 1: 0 was used since
    assert cache.lookup_from_thread(keys, loop) == [value, None, value, value]
    assert (cache.stats.hits, cache.stats.misses) == (4, 4)


@pytest.mark.parametrize("store", STORES)
async def test_local_cache_refuses_entries_over_its_limit(store: str) -> None:
    cache = local_cache(store, 10_000, 64)
    cache.put(b"k" * 16, bytes(65))
    assert cache.entries == 0 and cache.stats.too_large == 1
    cache.put(b"k" * 16, bytes(64))
    assert cache.entries == 1
    whole = local_cache(store, 200)  # an entry bigger than the whole cache is never stored
    whole.put(b"k" * 16, bytes(100))
    assert whole.entries == 0 and whole.stats.too_large == 1
    with pytest.raises(ValueError):
        LocalCache(size_bytes=0)


def test_settings_describe_hides_the_redis_password() -> None:
    settings = config.load(InferenceSettings, ["--cache-config", "redis,host=h", "--cache-config",
                                               "redis,password=hunter2"], env={})
    assert "hunter2" not in config.describe(settings)
    assert dataclasses.asdict(settings)["cache_config"]["password"] == "hunter2"


async def test_redis_down_counts_errors_backs_off_and_probes_one_at_a_time() -> None:
    """Nothing listens on the port: every command fails at once (no redis-server needed)."""
    from tensorwire.serving.cache import RedisCache
    from tests.conftest import free_port

    now = [100.0]
    cache = RedisCache(RedisCacheConfig(host="127.0.0.1", port=free_port()),
                       initial_backoff_s=1.0, max_backoff_s=4.0, clock=lambda: now[0])
    try:
        assert await cache.get(b"k" * 16) is None
        assert (cache.stats.errors, cache.stats.misses, cache.up) == (1, 1, False)
        # within the backoff: bypassed, no command, no error
        assert await cache.get(b"k" * 16) is None
        cache.put(b"k" * 16, b"value")
        assert (cache.stats.errors, cache.stats.bypassed) == (1, 2)
        # after it: one probe, which fails again and doubles the backoff
        now[0] += 1.0
        assert await cache.get(b"k" * 16) is None
        assert cache.stats.errors == 2
        now[0] += 1.5
        assert await cache.get(b"k" * 16) is None
        assert cache.stats.errors == 2 and cache.stats.bypassed == 3  # 2 s now, not 1
        now[0] += 1.0
        assert await cache.get(b"k" * 16) is None
        assert cache.stats.errors == 3
        assert "down" in repr(cache)
    finally:
        await cache.aclose()


# -- the native frontend's half: the same keys, the same store ----------------------------


@pytest.mark.skipif(_native is None, reason="native not built")
@settings(max_examples=200, deadline=None)
@given(
    model=st.text(min_size=1, max_size=12),
    version=st.integers(min_value=1, max_value=10**12),
    fingerprint=st.text(max_size=40),
    inputs=st.lists(
        st.tuples(st.text(min_size=1, max_size=10), st.sampled_from(["FP32", "INT64", "UINT8", "FP16"]),
                  st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=3), st.integers(0, 2**32)),
        min_size=1, max_size=4, unique_by=lambda t: t[0]),
    outputs=st.lists(st.text(min_size=1, max_size=8), max_size=3),
)
def test_the_native_frontend_computes_requestkeys_keys(model: str, version: int, fingerprint: str,
                                                       inputs: list[tuple[str, str, list[int], int]],
                                                       outputs: list[str]) -> None:
    """A native hit is found under the key the Python path stores (and back): the
    frontend's BLAKE2b and framing give RequestKeys' bytes, inputs in any order,
    data of every length (one block or many)."""
    tensors, raw = [], []
    for name, datatype, shape, seed in inputs:
        dtype = np.dtype({"FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8, "FP16": np.float16}[datatype])
        data = np.random.default_rng(seed).integers(0, 255, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        array = data.view(dtype).reshape(shape)
        tensors.append(_t(name, array, datatype))
        raw.append((name, datatype, shape, array.tobytes()))
    want = RequestKeys(model, version, fingerprint).key(tensors, outputs)
    assert _native.request_key(model, str(version), fingerprint, raw, outputs) == want


@pytest.mark.skipif(_native is None, reason="native not built")
def test_the_store_is_replaced_only_while_empty() -> None:
    cache = LocalCache(1 << 20)
    cache.put(b"k" * 16, b"v")
    with pytest.raises(RuntimeError, match="empty"):
        cache.use_store(_native.LruStore(1 << 20, ENTRY_OVERHEAD_BYTES))
