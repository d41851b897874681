"""The response cache on the request path, the one place requests meet it (both frontends).

A request is looked up once its version is resolved, before it enters that version's
batcher; a hit is answered without batcher or model, a miss runs as usual and its answer
is stored. Keys include the resolved version (``ModelVersion.cache_keys``), so a new
version never answers from an old one's entries and each side of a traffic split has its
own. The native frontend's batches go through the same cache (``answer_columns``): the
hits of a batch are answered from their entries, only its misses reach the model.

While a cache rarely has a version's answers (``ModelVersion.cache_hit_rate``,
:class:`tensorwire.serving.cache.HitRate`), an answer is stored only the second time its
request is seen (``HitRate.admit``), and with a remote cache (Redis) the misses do not
wait for the lookup: the request goes to the model at once and one in
``HitRate.SAMPLE_EVERY`` is looked up aside, only to keep the rate current.
While hits are rare and the version's forward is also cheap (what a lookup saves at
that rate, the rate times a forward, costs less than consulting the cache: both
measured), all but one request (or native batch) in ``HitRate.SAMPLE_EVERY`` leave the
cache alone: no key, lookup, doorkeeper or write, straight to the model
(:func:`skipping`; the native frontend still keys them, ~1 µs in C++, for the sampled
batches, and looks none up). A version whose forward is dearer is consulted on every
request whatever its rate.
``cache_hit``/``cache_miss`` count who answered (the cache, the model), in every mode.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import time
from collections.abc import Sequence

import numpy as np

from tensorwire.data.tensors import NUMPY_DTYPES
from tensorwire.serving.cache import (
    DecodedGroup,
    HitRate,
    ResponseCache,
    decode_values,
    encode_requests,
    encode_tensors,
)

from .records import InferRequest, InferResult
from .version import ModelVersion

log = logging.getLogger(__name__)

SKIP_RATE_FLOOR = 0.01
"""The least hit rate :func:`saving_share` assumes: the rate while hits are rare is an
estimate from the sampled lookups, and one that reads 0 is not taken at its word (a
version whose forward costs 100 times what consulting the cache does keeps consulting)."""


def saving_share(rate: HitRate) -> float:
    """The share of a forward that consulting the cache saves a request while hits are
    rare: the hit rate (a hit saves the forward), at least ``SKIP_RATE_FLOOR``."""
    return max(rate.ratio, SKIP_RATE_FLOOR)


def skipping(version: ModelVersion) -> bool:
    """Whether ``version``'s requests leave the cache alone but one (or one native
    batch) in ``HitRate.SAMPLE_EVERY``: hits are rare (``HitRate.racing``) and what a
    lookup saves a request (:func:`saving_share` of a forward) is less than what
    consulting costs one that misses, both as measured (``compute_infer`` per request;
    ``HitRate.consult_s``: key, lookup, doorkeeper, write; each a batch's time over its
    requests); either not measured yet: consulting. The native frontend is told with
    each batch's answer, and then stops looking the version's requests up itself
    (it still keys them: a sampled batch's keys, cheaper in C++ than here)."""
    rate = version.cache_hit_rate
    infer = version.stats.compute_infer
    consult_s = rate.consult_s
    return (rate.racing and infer.count > 0 and consult_s > 0
            and saving_share(rate) * infer.ns < consult_s * 1e9 * infer.count)


def _skips(version: ModelVersion, sampled: bool) -> bool:
    """Whether a request (or native batch), ``sampled`` or not, leaves the cache alone."""
    return not sampled and skipping(version)


def _missed(version: ModelVersion, spent: float, misses: int, requests: int = 1) -> None:
    """Count ``misses`` that consulted the cache for ``spent`` seconds each (of a batch
    of ``requests``) and, while the version races, note what consulting cost a request
    (:func:`skipping` compares it with the forward)."""
    version.stats.cache_miss.add(spent * misses, misses)
    rate = version.cache_hit_rate
    if rate.racing:
        rate.note_consulted(spent, requests)


async def infer_cached(cache: ResponseCache, version: ModelVersion, request: InferRequest) -> InferResult:
    """Look the request up in the response cache; on a miss run it and store the answer.
    While a remote cache rarely hits this version (``version.cache_hit_rate``), the
    request does not wait for its lookup (:func:`_infer_racing`); while any cache
    rarely hits it, an answer is stored at the second sighting of its request, and a
    cheap version's requests leave it alone but one in ``HitRate.SAMPLE_EVERY``."""
    start = time.perf_counter()
    rate = version.cache_hit_rate
    sampled = True
    if rate.racing:
        sampled = rate.sample()
        if _skips(version, sampled):
            return await _infer_uncached(version, request)
    key = version.cache_keys.key(request.inputs, request.outputs)
    if cache.remote and rate.racing:
        return await _infer_racing(cache, version, request, key, start, aside=sampled)
    value = await cache.get(key)
    rate.add_found(value is not None, 1)
    if value is not None:
        try:
            return version.cached_result(request, value, time.perf_counter() - start)
        except (ValueError, KeyError, struct.error) as exc:  # an entry this server cannot read
            cache.unreadable()
            log.warning("response cache entry of %s:%s unreadable (%s); running the model",
                        version.name, version.version, exc)
    lookup_s = time.perf_counter() - start
    try:
        result = await version.infer(request)
    except BaseException:
        version.stats.cache_miss.add(lookup_s)  # a miss all the same; nothing to store
        raise
    stored = time.perf_counter()
    if rate.admit(key):
        cache.put(key, encode_tensors(result.outputs))
    _missed(version, lookup_s + time.perf_counter() - stored, 1)
    return result


async def _infer_uncached(version: ModelVersion, request: InferRequest) -> InferResult:
    """A request that leaves the cache alone (:func:`_skips`): the model answers,
    counted as a miss that took the cache no time."""
    try:
        return await version.infer(request)
    finally:
        version.stats.cache_miss.add(0.0)
        version.cache_hit_rate.skipped += 1


async def _infer_racing(cache: ResponseCache, version: ModelVersion, request: InferRequest, key: bytes,
                        start: float, *, aside: bool) -> InferResult:
    """A request of a version the remote cache rarely answers: it goes to the model at
    once and, when ``aside`` (one in ``HitRate.SAMPLE_EVERY``), its lookup goes aside
    (the same MGETs), only to keep the hit rate current; the model answers, counted
    as a miss, and the answer is stored unless the lookup found it meanwhile. A hit
    is not waited for: that would cost every request the round trip this mode avoids
    (or a task each) for the few it saves a forward."""
    found: list[bytes | None] = []

    def noted(values: list[bytes | None]) -> None:
        version.cache_hit_rate.add(values)
        found.extend(values)

    if aside:
        cache.lookup_aside((key,), noted)
    lookup_s = time.perf_counter() - start
    try:
        result = await version.infer(request)
    except BaseException:
        version.stats.cache_miss.add(lookup_s)
        raise
    stored = time.perf_counter()
    if (not found or found[0] is None) and version.cache_hit_rate.admit(key):
        cache.put(key, encode_tensors(result.outputs))
    _missed(version, lookup_s + time.perf_counter() - stored, 1)
    return result


def answer_columns(cache: ResponseCache, loop: asyncio.AbstractEventLoop, version: ModelVersion,
                   columns: list[np.ndarray], rows: Sequence[int],
                   outputs: Sequence[Sequence[str]] | None,
                   keys: list[bytes] | None = None, looked_up: bool = False) -> tuple[list[np.ndarray], list[int]]:
    """A native frontend's batch through the response cache, from its batch thread:
    request ``i`` is the next ``rows[i]`` rows of every column (the config's input
    order) and asked for ``outputs[i]`` (empty or ``outputs`` None: all). The hits
    are answered from their entries, the misses run on the model in one forward
    and their answers are stored. ``keys``: the requests' keys when the frontend
    computed them (as :meth:`RequestKeys.batch_keys` does, in C++); ``looked_up``:
    it also looked them up (the local cache, in its native store) and all missed.
    Returns (every output column, one row per input
    row; the indexes of the requests that ran on the model). Raises ValueError when
    an entry does not fit the batch's columns (the frontend then serves each
    request on the Python path)."""
    rate = version.cache_hit_rate
    sampled = True
    if rate.racing:
        sampled = rate.sample()
        if _skips(version, sampled):
            return _uncached_batch(cache, version, columns, len(rows), keys is not None and looked_up)
    if keys is not None and looked_up:  # looked up already: every one missed
        return _looked_up_misses(cache, loop, version, columns, rows, outputs, keys)
    start = time.perf_counter()
    bounds = [0, *itertools.accumulate(rows)]
    wanted: Sequence[Sequence[str]] = outputs or [()] * len(rows)
    values: list[bytes | None]
    if keys is None:
        keys = version.cache_keys.batch_keys([(spec.name, spec.datatype) for spec in version.inputs],
                                             columns, bounds, wanted)
    if cache.remote and rate.racing:  # a rare hit is not waited for: every row runs, the lookups go aside
        if sampled:
            cache.lookup_aside_from_thread(keys, rate.add, loop)
        values = []
    else:
        values = cache.lookup_from_thread(keys, loop)
        if cache.remote:
            loop.call_soon_threadsafe(rate.add, values)
        else:  # answered here, in the batch thread
            rate.add(values)
    found: list[DecodedGroup] = []  # members: indexes of requests
    hits = [i for i, value in enumerate(values) if value is not None] if values.count(None) < len(values) else []
    if hits:
        groups, failed = decode_values([value for value in values if value is not None])
        if failed:
            cache.unreadable(len(failed))
        for _, exc in failed:
            log.warning("response cache entry of %s:%s unreadable (%s); running the model",
                        version.name, version.version, exc)
        found = [DecodedGroup([hits[j] for j in group.members], group.tensors) for group in groups]
    lookup_s = time.perf_counter() - start
    answered = {i for group in found for i in group.members}
    misses = [i for i in range(len(rows)) if i not in answered] if answered else list(range(len(rows)))
    if not answered:
        outs = version.forward_columns(columns, len(rows))
    else:
        ran: list[np.ndarray] = []
        if misses:
            ran = version.forward_columns(
                [np.concatenate([column[bounds[i] : bounds[i + 1]] for i in misses]) for column in columns],
                len(misses))
        outs = _merge_answers(version, ran, misses, found, bounds)
    stored = time.perf_counter()
    admitted = rate.admit_many([keys[i] for i in misses] if answered else keys)
    if admitted:
        _store(cache, loop, version, outs, keys, misses, admitted, bounds, wanted)
    stats = version.stats
    if answered:
        stats.cache_hit.add(lookup_s * len(answered), len(answered))
    if misses:
        _missed(version, lookup_s + time.perf_counter() - stored, len(misses), len(rows))
    return outs, misses


def _uncached_batch(cache: ResponseCache, version: ModelVersion, columns: list[np.ndarray], count: int,
                    looked_up: bool) -> tuple[list[np.ndarray], list[int]]:
    """A native batch that leaves the cache alone (:func:`_skips`): run in one
    forward, counted as misses that took the cache no time. When the frontend
    ``looked_up`` its requests (all missed; before it learned that the version skips),
    they count as the cache's lookups and in the hit rate, which the frontend's hits
    always reach (else the rate would see every hit but one miss in
    ``HitRate.SAMPLE_EVERY``)."""
    outs = version.forward_columns(columns, count)
    rate = version.cache_hit_rate
    if looked_up:
        cache.count_lookups(0, count)
        rate.add_found(0, count)
    rate.skipped += count
    version.stats.cache_miss.add(0.0, count)
    return outs, list(range(count))


def _looked_up_misses(cache: ResponseCache, loop: asyncio.AbstractEventLoop, version: ModelVersion,
                      columns: list[np.ndarray], rows: Sequence[int], outputs: Sequence[Sequence[str]] | None,
                      keys: list[bytes]) -> tuple[list[np.ndarray], list[int]]:
    """:func:`answer_columns` of a batch the native frontend looked up in the local
    cache's store itself, every request a miss: counted, run in one forward, offered to
    the doorkeeper; the general path's work for hits is skipped (about a third of what
    the cache added to a small native batch at 0 % hits, in-process)."""
    count = len(keys)
    outs = version.forward_columns(columns, count)
    start = time.perf_counter()  # what follows is the cache's (the frontend's lookup is not timed)
    cache.count_lookups(0, count)
    rate = version.cache_hit_rate
    rate.add_found(0, count)
    misses = list(range(count))
    admitted = rate.admit_many(keys)
    if admitted:
        _store(cache, loop, version, outs, keys, misses, admitted, [0, *itertools.accumulate(rows)],
               outputs or [()] * count)
    _missed(version, time.perf_counter() - start, count, count)
    return outs, misses


def _store(cache: ResponseCache, loop: asyncio.AbstractEventLoop, version: ModelVersion, outs: list[np.ndarray],
           keys: Sequence[bytes], misses: list[int], admitted: list[int], bounds: list[int],
           wanted: Sequence[Sequence[str]]) -> None:
    """Store the answers of ``misses[j]`` for each ``j`` in ``admitted`` (the
    doorkeeper's choice), each with the outputs its request asked for."""
    answers = [(spec.name, spec.datatype, np.ascontiguousarray(out, dtype=NUMPY_DTYPES[spec.datatype]))
               for spec, out in zip(version.outputs, outs)]
    names = [spec.name for spec in version.outputs]
    by_outputs: dict[tuple[str, ...], list[int]] = {}
    for j in admitted:
        by_outputs.setdefault(tuple(wanted[misses[j]]), []).append(misses[j])
    writes: list[tuple[bytes, bytes]] = []
    for asked, requests in by_outputs.items():
        picked = [answers[names.index(name)] for name in asked] if asked else answers
        writes += zip((keys[i] for i in requests), encode_requests(picked, bounds, requests))
    cache.put_many_from_thread(writes, loop)


def _merge_answers(version: ModelVersion, ran: list[np.ndarray], misses: list[int],
                   found: list[DecodedGroup], bounds: list[int]) -> list[np.ndarray]:
    """The batch's output columns from the model's answers to ``misses`` (``ran``)
    and the cache's to the others (``found``: groups of requests whose entries are
    laid out alike, each tensor's rows of all of them one after the other); an
    output a hit did not ask for stays zero there (the frontend does not send it)."""
    outs = []
    for j, spec in enumerate(version.outputs):
        if ran:
            inner = ran[j].shape[1:]
        else:
            inner = next((array.shape[1:] for group in found for name, _, array in group.tensors
                          if name == spec.name), tuple(max(d, 1) for d in spec.dims))
        column = np.zeros((bounds[-1], *inner), dtype=NUMPY_DTYPES[spec.datatype])
        if misses:
            column[_rows_of(misses, bounds)] = ran[j]
        for group in found:
            for name, datatype, array in group.tensors:
                if name != spec.name:
                    continue
                at = _rows_of(group.members, bounds)
                if datatype != spec.datatype or array.shape != (len(at), *inner):
                    raise ValueError(f"cached answer of {version.name}:{version.version} does not fit the batch "
                                     f"({spec.name!r}: {datatype} {list(array.shape)})")
                column[at] = array
        outs.append(column)
    return outs


def _rows_of(requests: list[int], bounds: list[int]) -> list[int]:
    """The batch rows of ``requests`` (request ``i``: rows ``bounds[i]:bounds[i + 1]``), in order."""
    return [row for i in requests for row in range(bounds[i], bounds[i + 1])]
