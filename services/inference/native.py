"""The native inference frontend: which frontend serves, and Python's side of the native one.

``--frontend native`` puts a grpc++ server (``native/frontend.cc``, built by
``scripts/build-native.sh`` into ``services/inference/_native*.so``) on the public
port, in this process, with its own threads. It serves ``ModelInfer`` requests,
and the messages of ``ModelStreamInfer`` streams, that it can prove valid against
the model's config: it parses them, batches them (the knobs of the version's
:class:`~tensorwire.serving.batching.BatchConfig`), and calls :meth:`NativeHooks.run_batch`
once per batch with contiguous numpy columns; it splits and encodes the answers
itself. Everything else -- the other RPCs, health, reflection, requests it cannot
prove valid (a stream's: one unary ``ModelInfer`` each, answered in the stream as
the Python servicer words it), calls whose token it has not seen accepted -- it
forwards byte for byte to the Python gRPC server,
which listens on a loopback port and answers exactly as it does without the
native frontend (same statuses, same messages, same role checks).

The rules the native side validates with come from here (:meth:`NativeHooks.spec`:
the model's inputs, datatypes, dims, item sizes and batching knobs, read from the
repository's loaded version), and are dropped whenever the repository swaps or
unloads a model (``ModelRepository.on_change``); there is no second copy of them.

A model with the response cache on is served natively too. With the local cache,
the frontend holds the cache's entries (``_native.LruStore``, the ``LocalCache``'s
store for both frontends): it computes each request's key itself (the same BLAKE2b
digest as ``RequestKeys``) and answers a hit on the gRPC thread that read it, with
no Python at all; :meth:`NativeHooks.collect_hits` adds those hits to the statistics
and metrics (before statistics are read, with each batch of misses, and every
second). Its misses, and every request with Redis, go to ``run_batch``, which hands
the batch to the repository's ``answer_columns`` (the same keys, entries and
statistics as the Python path): it answers what the cache has, runs only the rest
on the model and stores their answers. While a version skips the cache
(``cached.skipping``, told with each batch's answer) the frontend does not look its
requests up (it keys them still); Python consults the cache for the sampled batches.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from tensorwire.data.tensors import MAX_DIMS, NUMPY_DTYPES
from tensorwire.errors import TensorwireError
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.rpc import interceptor, metrics
from tensorwire.rpc.auth import Authorizer
from tensorwire.rpc.rpcnames import method_path
from tensorwire.serving.cache import ENTRY_OVERHEAD_BYTES, LocalCache

from . import cached
from .repository import ModelRepository
from .servicer import MAX_STREAM_IN_FLIGHT
from .version import set_torch_threads

log = logging.getLogger(__name__)

FRONTENDS = ("auto", "native", "python")
INFER_METHOD = method_path(pb, "GRPCInferenceService", "ModelInfer")
HITS_EVERY_S = 1.0
"""How often the native frontend's cache hits are added to the statistics and metrics
(besides whenever statistics are read)."""


def load_module() -> tuple[Any | None, str]:
    """The built extension (None when it is not built or cannot load) and why.
    ``TENSORWIRE_NATIVE_MODULE`` names another build of it to load instead (the
    AddressSanitizer build of the fuzz test)."""
    path = os.environ.get("TENSORWIRE_NATIVE_MODULE")
    try:
        if path:
            name = f"{__package__}._native"
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {path}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules[name] = module
            loaded: Any = sys.modules[name]
        else:
            from . import _native  # type: ignore[attr-defined]

            loaded = _native
    except ImportError as exc:
        return None, f"not built ({exc}); scripts/build-native.sh builds it (make native)"
    return loaded, f"grpc++ {loaded.GRPC_VERSION}"


def _bulk_observe(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, in a few numpy calls (prometheus_client's
    Histogram child: cumulative buckets are computed at collection time)."""
    if len(values) <= 4:  # the batches of a lightly loaded server: numpy's set-up costs more
        for v in values.tolist():
            histogram.observe(v)
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:  # another client version: one by one
        for v in values.tolist():
            histogram.observe(v)
        return
    counts = np.bincount(np.searchsorted(np.asarray(bounds), values, side="left"), minlength=len(bounds))
    for index, count in enumerate(counts.tolist()):
        if count:
            buckets[index].inc(count)
    total.inc(float(values.sum()))


class NativeHooks:
    """What the native frontend calls, with the GIL, once per model (``spec``), once
    per token a second (``authorize``), once per batch thread (``thread_started``) and
    once per batch (``run_batch``)."""

    def __init__(self, repository: ModelRepository, authorizer: Authorizer | None, service: str) -> None:
        self._repo = repository
        self._authorizer = authorizer if authorizer is not None and authorizer.enabled else None
        self._service = service
        self.take_hits: Any = None
        """The frontend's ``take_cache_counts`` when it answers the local cache's hits itself."""
        self._handled = metrics.RPC_HANDLED.labels(service, "ModelInfer", "OK")
        self._latency = metrics.RPC_LATENCY.labels(service, "ModelInfer")
        self._stream_latency = metrics.RPC_LATENCY.labels(service, "ModelStreamInfer")

    def thread_started(self) -> None:
        """Once in each native batch thread, before its first batch: torch's intra-op
        thread count, as every inference thread sets it (OpenMP's is per calling thread:
        left unset, each tanh of a tiny MLP woke an OpenMP worker and waited for it)."""
        set_torch_threads(self._repo.options.torch_threads)

    @staticmethod
    def numpy_dtype(datatype: str) -> np.dtype:
        return NUMPY_DTYPES[datatype]

    def spec(self, model: str) -> dict[str, Any] | None:
        """The rules a request of ``model`` must meet to be served natively; None: the
        model is not served natively (unknown, unbatched, BYTES tensors): its requests
        go to the Python frontend."""
        try:
            versions = self._repo.versions(model)
            mv = self._repo.version_of(model, str(versions[-1]))
        except TensorwireError:  # unknown, unloaded, failed: Python says which
            return None
        config = mv.batcher.config
        tensors = (*mv.inputs, *mv.outputs)
        if (mv.max_batch_size <= 0 or config.adaptive or any(t.datatype not in NUMPY_DTYPES or t.datatype == "BYTES"
                                                             for t in tensors)):
            return None
        routing = self._repo.routing(model)
        # The versions whose keys it computes (its key's parts for each); local cache:
        # looks them up too, unless the version skips the cache.
        try:
            cached = self._cached_versions(routing.versions) if self._repo.cache is not None else {}
        except Exception:  # its requests still go through the cache, in batches
            log.exception("native cache lookups of %s not set up", model)
            cached = {}
        # Not raised for Redis: the native queue's limit bounds whole batches, forward
        # included, and a model's max_concurrent_batches is a promise (GPU memory, a
        # module that is not thread-safe).
        concurrent = config.max_concurrent_batches
        return {
            "ready": sorted(routing.versions),
            "choices": list(routing.choices),
            "cumulative": list(routing.cumulative),
            "max_batch_size": config.max_batch_size,
            "max_queue_size": config.max_queue_size,
            "max_queue_delay_s": config.max_queue_delay_s,
            "preferred_batch_sizes": list(config.preferred_batch_sizes),
            "max_concurrent_batches": concurrent,
            "max_dims": MAX_DIMS,
            "inputs": [(t.name, t.datatype, list(t.dims), NUMPY_DTYPES[t.datatype].itemsize) for t in mv.inputs],
            "outputs": [(t.name, t.datatype, list(t.dims), NUMPY_DTYPES[t.datatype].itemsize) for t in mv.outputs],
            "cache": cached,
        }

    def _cached_versions(self, versions: dict[int, Any]) -> dict[str, tuple[str, str, str]]:
        return {str(version): mv.cache_keys.parts for version, mv in versions.items() if self._repo.caches(mv)}

    def collect_hits(self) -> None:
        """Add the requests the frontend answered from the cache since the last call to
        the versions' statistics, the cache's counters and the RPC metrics."""
        if self.take_hits is None:
            return
        try:
            self._add_hits(self.take_hits())
        except Exception:  # never in the way of a batch or a statistics read
            log.exception("native cache hits not counted")

    def _add_hits(self, taken: list[tuple[Any, ...]]) -> None:
        cache = self._repo.cache
        for model, version, hits, rows, seconds, unreadable, unary, latencies, overflow_s in taken:
            if cache is not None:  # an unreadable entry: an error and a miss (its batch counts the miss)
                cache.count(hits=hits, errors=unreadable)
            if unreadable:
                log.warning("%d response cache entries of %s:%s unreadable; the model answered those",
                            unreadable, model, version)
            if hits:
                try:
                    mv = self._repo.version_of(model, version)
                except TensorwireError:  # unloaded meanwhile: the cache's own counts stay
                    pass
                else:
                    mv.record_cache_hits(hits, rows, seconds)
                    mv.cache_hit_rate.add_found(hits, hits)
            if unary:
                self._handled.inc(unary)
                if unary > len(latencies):  # beyond those kept one by one: at their mean
                    latencies = np.concatenate([latencies, np.full(unary - len(latencies),
                                                                   overflow_s / (unary - len(latencies)))])
                _bulk_observe(self._latency, latencies)

    def authorize(self, header: bytes) -> bool:
        """Whether a ModelInfer call with this ``authorization`` value passes the role
        check (False: the call goes to the Python server, which says why not)."""
        if self._authorizer is None:
            return True
        try:
            self._authorizer.check(INFER_METHOD,
                                   (("authorization", header.decode("latin-1")),))
        except TensorwireError:
            return False
        return True

    def dropped(self, model: str, version: str, cancelled: int, expired: int, rejected: int = 0) -> None:
        """Requests of ``model``/``version`` dropped from the native queue before their
        batch ran: ``cancelled`` (the client went away, or their stream ended) and
        ``expired`` (deadline passed); and ``rejected``: refused while the queue was
        full (RESOURCE_EXHAUSTED); counted as the Python batcher counts its own."""
        try:
            batcher = self._repo.version_of(model, version).batcher
        except TensorwireError:  # unloaded meanwhile: nothing left to count on
            return
        batcher.record_dropped(cancelled, expired, rejected)

    def stream_done(self, code: str, seconds: float) -> None:
        """A natively served ModelStreamInfer stream ended: its RPC metrics, as the
        interceptor records a stream it serves (once per stream, not per message)."""
        self._stream_latency.observe(seconds)
        metrics.RPC_HANDLED.labels(self._service, "ModelStreamInfer", code).inc()

    def run_batch(self, model: str, version: str, columns: list[np.ndarray], waits: np.ndarray,
                  by_size: bool, rows: list[int],
                  outputs: list[tuple[str, ...]] | None,
                  unary: list[bool] | None = None,
                  keys: list[bytes] | None = None, hits_pending: bool = True,
                  looked_up: bool = False, fingerprint: str | None = None) -> tuple[str, list[np.ndarray], bool]:
        """One forward over a batch of natively validated requests for one version (the
        frontend routed each by the traffic split it got from ``spec``); ``waits``: each
        request's seconds in the native queue; ``by_size``: cut because it was full;
        ``rows``: each request's rows; ``outputs``: the outputs each asked for (None:
        none named any); ``unary``: which requests are ModelInfer calls, not stream
        messages (None: all are; only those count as ModelInfer RPCs). With the
        response cache on, only the misses run on the model; ``keys``: the requests'
        cache keys when the frontend computed them, and ``looked_up``: whether it also
        looked them up (the local cache's entries are in the frontend; all missed;
        not while the version skips the cache) or the cache is Redis (Python looks them
        up), and ``fingerprint``: the config they were computed for (a version
        reloaded since has other keys: Python computes those); ``hits_pending``: whether it has answered hits since they
        were last collected.
        Returns (the version, the output columns, whether the frontend leaves the
        version's next requests not looked up: ``cached.skipping``).
        Raises when that version is gone or no longer takes these columns (a swap):
        the frontend then hands each request to the Python path."""
        start = time.perf_counter()
        mv = self._repo.version_of(model, version)
        if len(columns) != len(mv.inputs):
            raise ValueError("inputs changed")
        for spec, column in zip(mv.inputs, columns):
            if column.dtype != NUMPY_DTYPES[spec.datatype] or len(column.shape) != len(spec.dims) + 1 or any(
                d != -1 and d != s for d, s in zip(spec.dims, column.shape[1:])
            ):
                raise ValueError(f"input {spec.name!r} changed")
        skip = False
        if self._repo.caches(mv):
            if keys is not None and fingerprint != mv.cache_keys.parts[2]:  # reloaded since: its own keys
                keys, looked_up = None, False
            if keys is not None and looked_up and hits_pending:  # its hits meanwhile count before these misses
                self.collect_hits()
            outs, ran = self._repo.answer_columns(mv, columns, rows, outputs, keys, looked_up)
            ran_count = len(ran)
            queued = waits[ran] if ran_count < len(waits) else waits
            skip = cached.skipping(mv)
        else:
            outs, ran_count = mv.forward_columns(columns, len(waits)), len(waits)
            queued = waits
        outs = [np.ascontiguousarray(o, dtype=NUMPY_DTYPES[t.datatype]) for t, o in zip(mv.outputs, outs)]
        latencies = waits + (time.perf_counter() - start)
        mv.record_batch(len(waits), columns[0].shape[0], float(latencies.sum()))
        if ran_count:  # the batcher's statistics count the requests that reached the model (as in Python)
            mv.batcher.record_external(ran_count, time.perf_counter() - start, queued.tolist(), by_size)
        if unary is not None:
            latencies = latencies[np.asarray(unary, dtype=bool)]
        if len(latencies):
            self._handled.inc(len(latencies))
            _bulk_observe(self._latency, latencies)
        return str(mv.version), outs, skip


class NativeFrontend:
    """The native server of one inference app (see the module docstring)."""

    def __init__(self, module: Any, repository: ModelRepository, threads: int, *, streams: bool = True) -> None:
        self._module = module
        self._repo = repository
        self._threads = threads
        self._streams = streams
        self._server: Any = None
        self._hooks: NativeHooks | None = None
        # With the local cache, this frontend keeps its entries (for both frontends).
        self._store: Any = None
        cache = repository.cache
        if isinstance(cache, LocalCache):
            self._store = module.LruStore(cache.size_bytes, ENTRY_OVERHEAD_BYTES)
            cache.use_store(self._store)

    def start(self, address: str, backend_port: int, *, name: str, max_message_bytes: int,
              reuse_port: bool, authorizer: Authorizer | None) -> int:
        """Listen on ``address``, forwarding to the Python server on ``backend_port``;
        returns the bound port (0: cannot bind)."""
        auth = authorizer is not None and authorizer.enabled
        hooks = NativeHooks(self._repo, authorizer, name)
        # The stream messages it forwards as unary ModelInfer calls carry the process's
        # secret tag: Python's interceptor counts them as part of their stream.
        server = self._module.Frontend(f"127.0.0.1:{backend_port}", hooks, self._threads, auth, self._streams,
                                       MAX_STREAM_IN_FLIGHT, interceptor.stream_message_token())
        if self._store is not None:
            server.set_cache(self._store)
            hooks.take_hits = server.take_cache_counts
        self._server, self._hooks = server, hooks
        port = int(server.start(address, max_message_bytes, reuse_port))
        if port:
            self._repo.on_change.append(self._changed)
            if self._store is not None:
                self._repo.before_statistics.append(hooks.collect_hits)
                loop = self._repo.loop
                if loop is not None:
                    loop.call_soon_threadsafe(self._tick)
        return port

    def _tick(self) -> None:
        """Every second, on the repository's loop: the frontend's cache hits into the
        statistics and metrics (which are also brought up to date whenever read)."""
        if self._hooks is None or self._server is None:
            return
        self._hooks.collect_hits()
        asyncio.get_running_loop().call_later(HITS_EVERY_S, self._tick)

    def _changed(self, model: str) -> None:
        if self._server is not None:
            self._server.invalidate()

    def stats(self) -> dict[str, int]:
        """Requests served natively, forwarded, batches, rejections, fallbacks, dropped
        while queued (expired, cancelled), streams."""
        return dict(self._server.stats()) if self._server is not None else {}

    def stop(self, grace_s: float) -> None:
        """Blocking (run it off the event loop: forwarded calls need the loop)."""
        if self._server is not None:
            self._server.stop(grace_s)
            if self._changed in self._repo.on_change:
                self._repo.on_change.remove(self._changed)
            hooks, self._hooks = self._hooks, None  # the timer stops at its next turn
            if hooks is not None:
                hooks.collect_hits()
                if hooks.collect_hits in self._repo.before_statistics:
                    self._repo.before_statistics.remove(hooks.collect_hits)


def choose(frontend: str, repository: ModelRepository, threads: int, *, tls: bool,
           streams: bool = True) -> tuple[NativeFrontend | None, str]:
    """The frontend ``--frontend`` selects, and the one line that says which serves and why."""
    if frontend == "python":
        return None, "frontend: python (--frontend python)"
    module, why = load_module()
    if module is None:
        if frontend == "native":
            raise RuntimeError(f"--frontend native: the native frontend is {why}")
        return None, f"frontend: python (the native frontend is {why})"
    if tls:
        if frontend == "native":
            raise RuntimeError("--frontend native does not serve TLS yet; use --frontend python or auto")
        return None, "frontend: python (TLS is on; the native frontend serves plaintext only)"
    return (NativeFrontend(module, repository, threads, streams=streams),
            f"frontend: native ({why}; {threads} batch threads{'' if streams else '; streams forwarded'})")
