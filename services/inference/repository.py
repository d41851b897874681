"""The inference core: models from a repository, versions, hot swap, traffic split.

The core's parts: ``records`` (what a model looks like, a request and its answer),
``stats`` (Triton's statistics), ``version`` (one loaded version behind its batcher),
``routing`` (the traffic split between a model's versions), ``cached`` (the response
cache on the request path), and here ``ModelRepository``: the repository folder's
scan and poll, the loads and swaps of versions, and the serving API the servicer,
the HTTP endpoint and the native frontend call.

``ModelRepository`` serves every model in a model repository folder
(``tensorwire.serving.modelrepo`` layout). For each model it loads the versions its
``version_policy`` selects, each with its own request batcher, and routes
requests without an explicit version by the config's ``traffic`` weights
(version -> weight; none = all on the newest).

Hot swap: when a new version appears (the repository is polled, or
RepositoryModelLoad asks), it is loaded beside the serving ones by the async
loader (built, weights loaded with ``weights_only=True``, a warm-up forward),
and only then is the routing table replaced, in one assignment. Requests that
already picked an old version finish on it; a version no longer selected is
unloaded once its last in-flight request has finished. Traffic weights change
at run time through config.json (polled) or RepositoryModelLoad's ``config``
parameter.

Models come in the tensorwire kinds (config.json) or Triton's format
(config.pbtxt; TorchScript, torch.export, ONNX: ``backends``); both go through
the same loader, batcher, swap and traffic split. A Triton model's traffic split
is its ``traffic`` parameter, and RepositoryModelLoad's ``config`` parameter
overrides its config in memory (its config.pbtxt is left as its owner wrote it).

Response cache (``tensorwire.serving.cache``, ``cached``): when the server has one and a
model's config enables it, a request is looked up once its version is resolved, before
it enters that version's batcher; the native frontend's batches too (``answer_columns``).

Lazy models (``RepositoryOptions.lazy_models``: by default ``run-*``, the trainer's
per-run checkpoints, thousands of them after a while) are not loaded at boot nor
looked at by polls. RepositoryIndex lists them UNAVAILABLE ("not loaded") until the
first request that names one (ModelInfer, ModelStreamInfer, ModelMetadata,
ModelConfig, ModelReady; gRPC and HTTP) loads it — that request waits for the load,
concurrent ones share it — or RepositoryModelLoad does (the trainer asks for one
after each checkpoint). Once loaded, one is served and polled like any other model,
and unloaded by the poll that finds its folder gone (the trainer deleted the run); an
explicit RepositoryModelUnload keeps it unloaded until it is loaded again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fnmatch
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tensorwire.calls.backoff import Backoff
from tensorwire.calls.periodic import Periodic
from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    TensorwireError,
    UnavailableError,
)
from tensorwire.serving import admission, modelrepo
from tensorwire.serving.batching import Batcher
from tensorwire.serving.cache import ResponseCache
from tensorwire.serving.loader import AsyncModelLoader, LoaderConfig

from . import backends, cached
from .records import PLATFORM, IndexEntry, InferRequest, InferResult, ModelInfo, tensor_infos
from .routing import Routing, ServedModel
from .stats import VersionStats
from .version import ModelVersion, config_fingerprint, set_torch_threads

log = logging.getLogger(__name__)

LAZY_MODELS = ("run-*",)
"""Models loaded on their first request, not at boot: the trainer's per-run checkpoints."""


_PERMANENT = (InvalidArgumentError, NotFoundError, FailedPreconditionError)


def _transient(exc: BaseException) -> bool:
    """Whether a failed load may succeed if tried again: not when it (or what it wraps)
    says the model itself is wrong."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _PERMANENT):
            return False
        seen = seen.__cause__
    return isinstance(exc, (TensorwireError, OSError))


@dataclass(frozen=True)
class RepositoryOptions:
    """Tuning of a ModelRepository (from the service settings)."""

    poll_interval_s: float = 1.0
    """How often the repository folder is scanned for new models and versions; 0 = never."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    batch_overrides: tuple[tuple[str, Any], ...] = ()
    """BatchConfig fields applied to every model (e.g. max_queue_size)."""
    infer_threads: int = 2
    """Threads running batched forwards (shared by every model)."""
    torch_threads: int = 1
    """Torch intra-op threads in each of those threads; 0 = torch's default."""
    device: str = "cpu"
    """Torch device the models live and run on ("cpu", "cuda:0", ...)."""
    fetch: Callable[[str], Awaitable[Any]] | None = None
    """Awaited with a model's name before RepositoryModelLoad reads it from the folder:
    mirrors the model from a remote (HTTP) repository (tensorwire.calls.httppool)."""
    max_concurrent_syncs: int = 16
    """Models a scan brings up to date at once (each queues its versions' loads)."""
    load_retries: int = 2
    """Tries after the first of a model whose load failed for a transient reason
    (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, an OSError) in the boot scan;
    after that each poll retries it once its backoff has passed. A broken model (bad
    config, weights that do not fit) is not retried until its files change."""
    retry_backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.5, max_s=10.0))
    """Waits between those tries."""
    max_model_bytes: int = admission.DEFAULT_MAX_MODEL_BYTES
    """Largest model a config override may ask for (parameters and buffers)."""
    cache: ResponseCache | None = None
    """The server's response cache (its owner closes it); used by the models whose
    config enables it."""
    lazy_models: tuple[str, ...] = LAZY_MODELS
    """Name patterns (fnmatch, case-sensitive) of the models loaded on their first
    request or RepositoryModelLoad instead of at boot, and not polled until then; () =
    every model at boot."""


class ModelRepository:
    """Every model of a repository folder, served; see the module docstring."""

    def __init__(self, root: Path, options: RepositoryOptions | None = None, *, seed: int | None = None) -> None:
        self.root = Path(root)
        self.options = options or RepositoryOptions()
        self._models: dict[str, ServedModel] = {}
        self._failed: dict[str, str] = {}
        self._failed_at: dict[str, tuple[object, tuple[int, ...]]] = {}
        """(config stamp, versions on disk) of a failed load: not retried until they change."""
        self._retry_at: dict[str, tuple[int, float]] = {}
        """(failures, monotonic time) of a transient load failure: polls retry it after then."""
        self._unloaded: set[str] = set()
        self._lazy = (re.compile("|".join(fnmatch.translate(p) for p in self.options.lazy_models))
                      if self.options.lazy_models else None)
        """``lazy_models`` as one pattern (a poll matches every name in the folder)."""
        self._demand: dict[str, asyncio.Task[None]] = {}
        """The load of a lazy model that requests are waiting for, by name (one each)."""
        self._overrides: dict[str, dict[str, Any]] = {}
        """RepositoryModelLoad config overrides of Triton models (their files stay as written)."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._config_stamp: dict[str, float | None] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._poller: Periodic | None = None
        self._random = random.Random(seed)
        # OpenMP's thread count is per calling thread: a pool thread that never called
        # torch.set_num_threads runs every op on all cores' spinning OpenMP workers (on
        # 2 busy cores, a 70 us forward took 20 ms). Each inference thread sets it first.
        self.infer_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.options.infer_threads, thread_name_prefix="infer",
            initializer=set_torch_threads, initargs=(self.options.torch_threads,),
        )
        self.loader: AsyncModelLoader[tuple[str, int, str], Any] = AsyncModelLoader(
            self._load_module, self.options.loader, name="models"
        )
        self.ready = False
        self._ready_event = asyncio.Event()
        self._boot_over = asyncio.Event()
        """Set when the boot scan ends or the repository closes (requests that wait for it)."""
        self._boot_task: asyncio.Task[None] | None = None
        self.swaps = 0
        self.cache = self.options.cache
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop the repository runs on (the native frontend's threads reach Redis through it)."""
        self.on_change: list[Callable[[str], None]] = []
        """Called with a model's name after its routing was replaced or it was unloaded
        (the native frontend drops the rules it validated that model's requests with)."""
        self.before_statistics: list[Callable[[], None]] = []
        """Called before statistics are read: whoever keeps counts elsewhere adds them
        (the native frontend, its cache hits)."""

    def __repr__(self) -> str:
        served = ", ".join(
            f"{m.name}:{'/'.join(str(v) for v in m.routing.versions)}" for m in self._models.values()
        )
        return f"<ModelRepository {self.root}: {served or 'no models'}; {len(self._retiring)} retiring>"

    # -- life cycle ---------------------------------------------------------

    async def start(self, *, wait: bool = True) -> None:
        """Load everything in the repository (the boot scan), then poll it in the background.

        ``wait=False`` returns at once with the boot scan running: ``ready`` stays False
        (health NOT_SERVING, ServerReady false) until it has tried every model, then
        turns True whatever failed (those models are UNAVAILABLE, their reason in
        RepositoryIndex)."""
        self._loop = asyncio.get_running_loop()
        if wait:
            await self._boot()
        else:
            self._boot_task = asyncio.get_running_loop().create_task(self._boot(), name="repository-boot")

    async def _boot(self) -> None:
        start = time.perf_counter()
        try:
            await self.scan(retries=self.options.load_retries)
        except Exception:  # e.g. the folder unreadable: serve what loaded; polls scan again
            if not self._boot_task:
                raise
            log.exception("boot scan of %s failed", self.root)
        self.ready = True
        self._ready_event.set()
        self._boot_over.set()
        log.info("boot scan done in %.1fs: %d models serving, %d failed", time.perf_counter() - start,
                 len(self._models), len(self._failed))
        if self.options.poll_interval_s > 0:
            self._poller = Periodic(self.scan, self.options.poll_interval_s, name="repository poll").start()

    async def until_ready(self) -> None:
        """Return once the boot scan is done."""
        await self._ready_event.wait()

    async def scan(self, retries: int = 0) -> None:
        """Bring every model on disk (not explicitly unloaded) up to date, at most
        ``max_concurrent_syncs`` models at a time (any number of models: none is refused
        for a full queue); a transient failure is tried again ``retries`` times. A loaded
        lazy model whose folder is gone (the trainer's DeleteRun, ``--keep-runs``) is
        unloaded."""
        names = modelrepo.list_models(self.root, skip=self._not_scanned)
        slots = asyncio.Semaphore(self.options.max_concurrent_syncs)

        async def one(name: str) -> None:
            async with slots:
                await self._sync_quietly(name, retries)

        await asyncio.gather(*(one(name) for name in names))
        listed = set(names)
        for name in [n for n in self._models if n not in listed and self.is_lazy(n)]:
            if self.root.is_dir() and not modelrepo.has_model(self.root, name):
                await self._forget(name)

    async def _forget(self, name: str) -> None:
        """Stop serving a lazy model that left the repository (as a first request
        would, a new folder of that name loads on its first request)."""
        async with self._lock(name):
            if modelrepo.has_model(self.root, name):
                return  # back meanwhile
            served = self._models.pop(name, None)
            self._config_stamp.pop(name, None)
            self._failed.pop(name, None)
            self._failed_at.pop(name, None)
            self._retry_at.pop(name, None)
            if served is not None:
                log.info("model %s left the repository; unloaded", name)
                self._changed(name)
                self._retire(list(served.routing.versions.values()))

    def _not_scanned(self, name: str) -> bool:
        """Left out of scans: explicitly unloaded models, and lazy ones not loaded."""
        return name in self._unloaded or (name not in self._models and self.is_lazy(name))

    def is_lazy(self, name: str) -> bool:
        """Whether ``name`` is loaded on its first request (``lazy_models``), not at boot."""
        return self._lazy is not None and self._lazy.match(name) is not None

    async def load_on_demand(self, name: str, *, wait_for_boot: bool = True) -> None:
        """Load ``name`` now if it is a lazy model on disk that is not loaded (nor
        explicitly unloaded), and return once that load has finished, loaded or not
        (the caller then finds it served, or ``_served`` says why not). Concurrent
        callers wait for the same load, which goes on when a caller is cancelled.
        Returns at once for any other model, except while the boot scan runs: a model
        on disk that it has not tried yet is waited for (the servers listen before it
        ends; "unknown model" would be wrong, and it is loading). ``wait_for_boot=False``
        (ModelReady: a probe wants its answer now) never waits for the scan."""
        if name in self._models or name in self._unloaded:
            return
        if (not self.ready and wait_for_boot and not self.is_lazy(name) and name not in self._failed
                and modelrepo.has_model(self.root, name)):
            await self._boot_over.wait()  # bounded by the caller's deadline, and by aclose
            return
        if not self.is_lazy(name):
            return
        task = self._demand.get(name)
        if task is None:
            if not modelrepo.has_model(self.root, name):
                return  # NOT_FOUND, from whatever the caller asks next
            task = asyncio.get_running_loop().create_task(self._load_lazily(name), name=f"load {name}")
            self._demand[name] = task
            task.add_done_callback(lambda _: self._demand.pop(name, None))
        await asyncio.shield(task)

    async def _load_lazily(self, name: str) -> None:
        start = time.perf_counter()
        # As a poll would: a model that failed with these very files is not tried again,
        # a transient failure only after its backoff (a broken model costs its requests
        # no load each); the reason stays in _failed for the caller's status.
        await self._sync_quietly(name, priority=10, skip_unloaded=True)
        if name in self._models:
            log.info("model %s loaded on demand in %.2fs", name, time.perf_counter() - start)

    async def _sync_quietly(self, name: str, retries: int = 0, *, priority: int = 0,
                            skip_unloaded: bool = True) -> None:
        path = modelrepo.config_path(self.root, name)
        try:
            stamp = path.stat().st_mtime_ns if path.exists() else None  # None: auto-completed
            state = (stamp, tuple(modelrepo.list_versions(self.root, name)))
        except OSError:
            return
        if self._failed_at.get(name) == state:
            return  # failed before with exactly these files; a poll does not retry it
        failures, not_before = self._retry_at.get(name, (0, 0.0))
        if time.monotonic() < not_before:
            return  # a transient failure: a later poll tries again, after its backoff
        for attempt in range(1, retries + 2):
            try:
                await self.sync(name, priority=priority, skip_unloaded=skip_unloaded)
                self._failed_at.pop(name, None)
                self._retry_at.pop(name, None)
                return
            except Exception as exc:
                # The error is kept for RepositoryIndex; the previous versions keep serving.
                self._failed[name] = str(exc)
                if not _transient(exc):
                    self._failed_at[name] = state
                    return
                failures += 1
                delay = self.options.retry_backoff.delay_s(failures)
                if attempt > retries:
                    self._retry_at[name] = (failures, time.monotonic() + delay)
                    return
                log.info("model %s: load failed (%s); try %d of %d", name, exc, attempt + 1, retries + 1)
                await asyncio.sleep(delay)

    async def aclose(self) -> None:
        self.ready = False
        if self._boot_task is not None:
            self._boot_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._boot_task
        self._boot_over.set()  # requests waiting for a scan that will not finish answer now
        if self._poller is not None:
            await self._poller.aclose()
        for task in list(self._demand.values()):
            task.cancel()
        await asyncio.gather(*list(self._demand.values()), return_exceptions=True)
        for model in list(self._models.values()):
            self._retire(list(model.routing.versions.values()))
        self._models.clear()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.loader.aclose()
        self.infer_executor.shutdown(wait=True)

    # -- loading and swapping -------------------------------------------------

    def _load_module(self, key: tuple[str, int, str]) -> Any:
        """Loader thread: the version's backend loads it safely and warms it up."""
        name, version, _ = key
        set_torch_threads(self.options.torch_threads)  # this is a loader thread: see infer_executor
        config = self._read_config(name)
        return backends.load(self.root, name, version, config, self.options.device)

    def _read_config(self, name: str) -> dict[str, Any]:
        """The model's config from the repository, with its in-memory override (a Triton
        model's for as long as it is loaded; a tensorwire kind's while its load runs)."""
        config = modelrepo.read_config(self.root, name)
        override = self._overrides.get(name)
        if override:
            config.update(override)
            config = modelrepo.validate_config(config, name)
        return config

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def sync(self, name: str, config_override: dict[str, Any] | None = None, *, priority: int = 0,
                   skip_unloaded: bool = False) -> None:
        """Load the versions ``name``'s policy selects, swap them in, retire the rest.
        ``skip_unloaded``: do nothing if ``name`` is explicitly unloaded by the time it is
        its turn (a scan or a first request that raced RepositoryModelUnload).

        A ``config_override`` is checked against ``tensorwire.serving.admission``'s bounds before
        anything is built, applied in memory for the load, and written to config.json
        (tensorwire kinds) only once every version it selects has loaded; a failed load
        leaves the previous config and versions serving."""
        async with self._lock(name):
            if skip_unloaded and name in self._unloaded:
                return
            if not config_override:
                await self._sync_locked(name, priority)
                return
            current = await asyncio.to_thread(self._read_config, name)
            admission.check_override(current, config_override, modelrepo.list_versions(self.root, name),
                                     max_model_bytes=self.options.max_model_bytes)
            previous = self._overrides.get(name)
            self._overrides[name] = {**(previous or {}), **config_override}
            try:
                merged = await asyncio.to_thread(self._read_config, name)  # the whole config, validated
                self._config_stamp.pop(name, None)  # reconsider the served versions
                await self._sync_locked(name, priority, all_or_nothing=True)
                if not modelrepo.is_triton_model(self.root, name):
                    # Serving now: persist it (a Triton model's config.pbtxt stays as its owner wrote it).
                    await asyncio.to_thread(modelrepo.write_config, self.root, name, merged)
                    self._overrides.pop(name, None)
                    self._config_stamp[name] = modelrepo.config_path(self.root, name).stat().st_mtime_ns
            except BaseException:
                if previous is None:
                    self._overrides.pop(name, None)
                else:
                    self._overrides[name] = previous
                raise

    async def _sync_locked(self, name: str, priority: int, *, all_or_nothing: bool = False) -> None:
        """``sync`` under the model's lock; ``all_or_nothing``: a version that fails to
        load fails the whole swap (nothing changes)."""
        path = modelrepo.config_path(self.root, name)
        stamp = path.stat().st_mtime_ns if path.exists() else None
        served = self._models.get(name)
        available = modelrepo.list_versions(self.root, name)
        if (
            served is not None
            and name in self._config_stamp and stamp == self._config_stamp[name]
            and set(served.config["version_policy"].select(available))
            == set(served.routing.versions)
        ):
            return  # nothing changed
        # Off the event loop: auto-completing a Triton model opens its graph file.
        config = await asyncio.to_thread(self._read_config, name)
        wanted = config["version_policy"].select(available)
        if not wanted:
            raise NotFoundError(f"model {name!r} has no version its version_policy selects")
        fingerprint = config_fingerprint(config)
        current = served.routing.versions if served else {}
        keep = {
            v: mv for v, mv in current.items()
            if v in wanted and config_fingerprint(mv.config) == fingerprint
        }
        cache_on = modelrepo.response_cache_enabled(config)
        if any(mv.response_cache_enabled != cache_on for mv in keep.values()):
            for mv in keep.values():  # a kept version follows the config's cache switch
                mv.response_cache_enabled = cache_on
            self._changed(name)  # at once (the native frontend looks up by these rules)
        missing = [v for v in wanted if v not in keep]
        futures = [await self.loader.enqueue((name, v, fingerprint), priority) for v in missing]
        results = await asyncio.gather(*futures, return_exceptions=True)
        batch_overrides = dict(self.options.batch_overrides)
        errors = []
        new = dict(keep)
        for version, result in zip(missing, results):
            self.loader.evict((name, version, fingerprint))  # the version owns it now
            if isinstance(result, BaseException):
                errors.append(f"version {version}: {result}")
        if errors and all_or_nothing:
            first = next(r for r in results if isinstance(r, BaseException))
            cls = type(first) if isinstance(first, TensorwireError) else UnavailableError
            raise cls(f"model {name!r} was not changed: {'; '.join(errors)}") from first
        for version, result in zip(missing, results):
            if isinstance(result, BaseException):
                continue
            new[version] = ModelVersion(
                name, version, config, result, self.infer_executor, batch_overrides, self.options.device
            )
        if not new:
            raise UnavailableError(f"model {name!r} could not be loaded: {'; '.join(errors)}") from next(
                r for r in results if isinstance(r, BaseException)
            )
        # The swap: one assignment; requests that picked old versions finish on them.
        self._models[name] = ServedModel(name, config, Routing.build(new, config["traffic"]))
        self._config_stamp[name] = stamp
        self._changed(name)
        if errors:
            self._failed[name] = "; ".join(errors)
        else:
            self._failed.pop(name, None)
        retired = [mv for v, mv in current.items() if new.get(v) is not mv]
        if missing:
            self.swaps += 1
            log.info("model %s now serves versions %s", name, sorted(new))
        self._retire(retired)

    def _retire(self, versions: list[ModelVersion]) -> None:
        for version in versions:
            task = asyncio.get_running_loop().create_task(version.drain_and_close())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def load_model(self, name: str, config_override: dict[str, Any] | None = None) -> None:
        """RepositoryModelLoad: (re)load ``name`` now; returns when it is serving."""
        modelrepo.check_name(name)
        if self.options.fetch is not None:
            await self.options.fetch(name)
        if not modelrepo.has_model(self.root, name):
            raise NotFoundError(f"model {name!r} is not in the repository {str(self.root)!r}")
        self._unloaded.discard(name)
        try:
            await self.sync(name, config_override, priority=10)
        except Exception as exc:
            self._failed[name] = str(exc)
            raise

    async def unload_model(self, name: str) -> None:
        """RepositoryModelUnload: stop serving ``name`` until it is loaded again."""
        modelrepo.check_name(name)
        async with self._lock(name):
            served = self._models.pop(name, None)
            if served is None and not modelrepo.has_model(self.root, name):
                raise NotFoundError(f"model {name!r} is neither loaded nor in the repository")
            self._unloaded.add(name)
            self._config_stamp.pop(name, None)
            if served is not None:
                self._changed(name)
                self._retire(list(served.routing.versions.values()))

    def _changed(self, name: str) -> None:
        for listener in list(self.on_change):
            try:
                listener(name)
            except Exception:
                log.exception("on_change listener failed for model %s", name)

    async def wait_retired(self) -> None:
        """Wait until every retired version has drained and closed (tests, shutdown)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    # -- serving --------------------------------------------------------------

    def _served(self, name: str) -> ServedModel:
        served = self._models.get(name)
        if served is None:
            if name in self._failed:
                raise UnavailableError(f"model {name!r} failed to load: {self._failed[name]}")
            if name in self._unloaded:
                raise NotFoundError(f"model {name!r} is unloaded; RepositoryModelLoad serves it again")
            if self.is_lazy(name) and modelrepo.has_model(self.root, name):
                raise UnavailableError(f"model {name!r} is not loaded; its first request "
                                       "(ModelInfer, ModelMetadata, ModelReady) or RepositoryModelLoad loads it")
            if not self.ready and modelrepo.has_model(self.root, name):
                raise UnavailableError(f"model {name!r} is loading: the repository's boot scan is running")
            raise NotFoundError(f"unknown model {admission.echo(name)}")
        return served

    def version_of(self, name: str, version: str) -> ModelVersion:
        """The version to use: the explicit one, else one picked by the traffic split."""
        served = self._served(name)
        routing = served.routing
        if not version:
            return routing.pick(self._random.random())
        number = admission.parse_version(version)
        found = routing.versions.get(number)
        if found is None:
            ready = ", ".join(str(v) for v in sorted(routing.versions))
            raise NotFoundError(f"model {name!r} has no ready version {number} (ready: {ready})")
        return found

    async def infer(self, request: InferRequest) -> InferResult:
        if request.model not in self._models:
            await self.load_on_demand(request.model)
        version = self.version_of(request.model, request.version)
        if self.cache is not None and version.response_cache_enabled:
            return await cached.infer_cached(self.cache, version, request)
        return await version.infer(request)

    # -- the response cache: the one place requests meet it (both frontends) ----------

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the repository runs on (None before ``start``)."""
        return self._loop

    def caches(self, version: ModelVersion) -> bool:
        """Whether ``version``'s requests go through the response cache."""
        return self.cache is not None and version.response_cache_enabled

    def answer_columns(self, version: ModelVersion, columns: list[np.ndarray], rows: Sequence[int],
                       outputs: Sequence[Sequence[str]] | None,
                       keys: list[bytes] | None = None,
                       looked_up: bool = False) -> tuple[list[np.ndarray], list[int]]:
        """A native frontend's batch through the response cache (``cached.answer_columns``),
        from its batch thread."""
        cache, loop = self.cache, self._loop
        assert cache is not None and loop is not None
        return cached.answer_columns(cache, loop, version, columns, rows, outputs, keys, looked_up)

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.version_of(name, version) if version else self._served(name)
        except Exception:
            return False
        return True

    def info(self, name: str, version: str = "") -> ModelInfo:
        served = self._served(name)
        if version:
            self.version_of(name, version)
        cfg = served.config
        return ModelInfo(
            name=name,
            versions=tuple(sorted(served.routing.versions)),
            platform=cfg.get("platform", PLATFORM),
            max_batch_size=int(cfg["max_batch_size"]),
            inputs=tensor_infos(cfg["inputs"]),
            outputs=tensor_infos(cfg["outputs"]),
            max_queue_delay_us=int(cfg["max_queue_delay_us"]),
            preferred_batch_size=tuple(cfg.get("preferred_batch_size", [])),
            version_policy=cfg["version_policy"],
            response_cache_enabled=bool(cfg.get("response_cache_enabled", False)),
            config={**cfg, "platform": cfg.get("platform", PLATFORM)},
        )

    def statistics(self, name: str = "", version: str = "") -> list[tuple[str, int, VersionStats]]:
        for collect in list(self.before_statistics):  # counts kept elsewhere (the native frontend's hits)
            try:
                collect()
            except Exception:
                log.exception("collecting statistics kept elsewhere failed")
        if name:
            served = [self._served(name)]
            if version:
                mv = self.version_of(name, version)
                return [(name, mv.version, mv.snapshot_stats())]
        else:
            served = list(self._models.values())
        return [
            (m.name, v, mv.snapshot_stats())
            for m in sorted(served, key=lambda m: m.name)
            for v, mv in sorted(m.routing.versions.items())
        ]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = []
        names = set(modelrepo.list_models(self.root)) | set(self._models)
        for name in sorted(names):
            served = self._models.get(name)
            if served is not None:
                for v in sorted(served.routing.versions):
                    entries.append(IndexEntry(name, str(v), "READY"))
            elif not ready_only:
                reason = self._failed.get(name) or ("unloaded" if name in self._unloaded else "not loaded")
                if reason == "not loaded" and self.is_lazy(name):
                    reason = "not loaded; loads on its first request"
                entries.append(IndexEntry(name, "", "UNAVAILABLE", reason))
        return entries

    def batchers(self) -> list[tuple[str, int, Batcher]]:
        """(model, version, batcher) of every serving version (for metrics)."""
        return [
            (m.name, v, mv.batcher)
            for m in list(self._models.values())
            for v, mv in sorted(m.routing.versions.items())
        ]

    @property
    def load_errors(self) -> dict[str, str]:
        """The last load error of each model whose newest load failed."""
        return dict(self._failed)

    def routing(self, name: str) -> Routing:
        """The routing table serving ``name`` now (NotFoundError/UnavailableError as infer)."""
        return self._served(name).routing

    def versions(self, name: str) -> list[int]:
        return sorted(self._served(name).routing.versions)
