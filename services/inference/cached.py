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
``cache_hit``/``cache_miss`` count who answered (the cache, the model), in either mode.
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
from tensorwire.serving.cache import ResponseCache, decode_tensors, encode_rows, encode_tensors

from .records import InferRequest, InferResult
from .version import ModelVersion

log = logging.getLogger(__name__)


async def infer_cached(cache: ResponseCache, version: ModelVersion, request: InferRequest) -> InferResult:
    """Look the request up in the response cache; on a miss run it and store the answer.
    While a remote cache rarely hits this version (``version.cache_hit_rate``), the
    request does not wait for its lookup (:func:`_infer_racing`); while any cache
    rarely hits it, an answer is stored at the second sighting of its request."""
    start = time.perf_counter()
    key = version.cache_keys.key(request.inputs, request.outputs)
    rate = version.cache_hit_rate
    if cache.remote and rate.racing:
        return await _infer_racing(cache, version, request, key, start)
    value = await cache.get(key)
    rate.add((value,))
    if value is not None:
        try:
            return version.cached_result(request, value, time.perf_counter() - start)
        except (ValueError, KeyError, struct.error) as exc:  # an entry this server cannot read
            cache.stats.errors += 1
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
    version.stats.cache_miss.add(lookup_s + time.perf_counter() - stored)
    return result


async def _infer_racing(cache: ResponseCache, version: ModelVersion, request: InferRequest, key: bytes,
                        start: float) -> InferResult:
    """A request of a version the remote cache rarely answers: it goes to the model at
    once and its lookup goes aside (the same MGETs), only to keep the hit rate current;
    the model answers, counted as a miss, and the answer is stored unless the lookup
    found it meanwhile. A hit is not waited for: that would cost every request the
    round trip this mode avoids (or a task each) for the few it saves a forward."""
    found: list[bytes | None] = []

    def noted(values: list[bytes | None]) -> None:
        version.cache_hit_rate.add(values)
        found.extend(values)

    if version.cache_hit_rate.sample():
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
    version.stats.cache_miss.add(lookup_s + time.perf_counter() - stored)
    return result


def answer_columns(cache: ResponseCache, loop: asyncio.AbstractEventLoop, version: ModelVersion,
                   columns: list[np.ndarray], rows: Sequence[int],
                   outputs: Sequence[Sequence[str]] | None) -> tuple[list[np.ndarray], list[int]]:
    """A native frontend's batch through the response cache, from its batch thread:
    request ``i`` is the next ``rows[i]`` rows of every column (the config's input
    order) and asked for ``outputs[i]`` (empty or ``outputs`` None: all). The hits
    are answered from their entries, the misses run on the model in one forward
    and their answers are stored. Returns (every output column, one row per input
    row; the indexes of the requests that ran on the model). Raises ValueError when
    an entry does not fit the batch's columns (the frontend then serves each
    request on the Python path)."""
    start = time.perf_counter()
    bounds = [0, *itertools.accumulate(rows)]
    wanted: Sequence[Sequence[str]] = outputs or [()] * len(rows)
    keys = version.cache_keys.batch_keys([(spec.name, spec.datatype) for spec in version.inputs],
                                         columns, bounds, wanted)
    found: dict[int, dict[str, tuple[str, np.ndarray]]] = {}
    rate = version.cache_hit_rate
    if cache.remote and rate.racing:  # a rare hit is not waited for: every row runs, the lookups go aside
        if rate.sample():
            loop.call_soon_threadsafe(cache.lookup_aside, keys, rate.add)
        values: list[bytes | None] = []
    else:
        values = cache.lookup_from_thread(keys, loop)
        if cache.remote:
            loop.call_soon_threadsafe(rate.add, values)
        else:  # answered here, in the batch thread
            rate.add(values)
    if values.count(None) < len(values):
        for i, value in enumerate(values):
            if value is None:
                continue
            try:
                found[i] = {name: (datatype, array) for name, datatype, array in decode_tensors(value)}
            except (ValueError, KeyError, struct.error) as exc:
                cache.stats.errors += 1
                log.warning("response cache entry of %s:%s unreadable (%s); running the model",
                            version.name, version.version, exc)
    lookup_s = time.perf_counter() - start
    if not found:
        misses = list(range(len(rows)))
        outs = version.forward_columns(columns, len(rows))
    else:
        misses = [i for i in range(len(rows)) if i not in found]
        ran: list[np.ndarray] = []
        if misses:
            ran = version.forward_columns(
                [np.concatenate([column[bounds[i] : bounds[i + 1]] for i in misses]) for column in columns],
                len(misses))
        outs = _merge_answers(version, ran, misses, found, bounds)
    stored = time.perf_counter()
    admitted = rate.admit_many([keys[i] for i in misses] if found else keys)
    if admitted:
        answers = [(spec.name, spec.datatype, np.ascontiguousarray(out, dtype=NUMPY_DTYPES[spec.datatype]))
                   for spec, out in zip(version.outputs, outs)]
        names = [spec.name for spec in version.outputs]
        writes = []
        for i in (misses[j] for j in admitted):
            picked = [answers[names.index(name)] for name in wanted[i]] if wanted[i] else answers
            writes.append((keys[i], encode_rows(picked, bounds[i], bounds[i + 1])))
        cache.put_many_from_thread(writes, loop)
    stats = version.stats
    if found:
        stats.cache_hit.add(lookup_s * len(found), len(found))
    if misses:
        stats.cache_miss.add((lookup_s + time.perf_counter() - stored) * len(misses), len(misses))
    return outs, misses


def _merge_answers(version: ModelVersion, ran: list[np.ndarray], misses: list[int],
                   found: dict[int, dict[str, tuple[str, np.ndarray]]], bounds: list[int]) -> list[np.ndarray]:
    """The batch's output columns from the model's answers to ``misses`` (``ran``)
    and the cache's to the others (``found``); an output a hit did not ask for
    stays zero there (the frontend does not send it)."""
    outs = []
    for j, spec in enumerate(version.outputs):
        if ran:
            inner = ran[j].shape[1:]
        else:
            inner = next((answer[spec.name][1].shape[1:] for answer in found.values() if spec.name in answer),
                         tuple(max(d, 1) for d in spec.dims))
        column = np.zeros((bounds[-1], *inner), dtype=NUMPY_DTYPES[spec.datatype])
        at = 0
        for i in misses:
            size = bounds[i + 1] - bounds[i]
            column[bounds[i] : bounds[i + 1]] = ran[j][at : at + size]
            at += size
        for i, answer in found.items():
            if spec.name not in answer:
                continue
            datatype, array = answer[spec.name]
            if datatype != spec.datatype or array.shape != (bounds[i + 1] - bounds[i], *inner):
                raise ValueError(f"cached answer of {version.name}:{version.version} does not fit the batch "
                                 f"({spec.name!r}: {datatype} {list(array.shape)})")
            column[bounds[i] : bounds[i + 1]] = array
        outs.append(column)
    return outs
