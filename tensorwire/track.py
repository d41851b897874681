"""Watch any PyTorch training live: the in-process SDK (``tensorwire.init``).

::

    import tensorwire
    run = tensorwire.init(task="my-cnn", params={"learning_rate": 1e-3})
    for step, (x, y) in enumerate(loader):
        loss = ...
        run.log(step, loss=loss, accuracy=acc)          # scalars (tensors too)
        run.view("samples", lambda: x[:16])              # built only when watched
        if run.should_stop:                              # Stop pressed in the browser
            break
        run.wait_if_paused()                             # Pause/Resume in the browser
        lr = run.params["learning_rate"]                 # changed live (UpdateRun)
    run.checkpoint(model, name="my-cnn", inputs=x)       # exported, pushed to inference
    run.finish()                                         # (else at exit: completed/stopped)

Nothing here blocks the training loop on the network. ``log`` appends to a
deque (a fraction of a microsecond); ``view`` stores a callback; the rest happens
in one background thread with its own asyncio loop, which every ``tick_s``:

- drains the deque into a bounded scalar buffer (merged into min/mean/max
  buckets, never dropped; tensors are read there, not on the training thread)
  and into the outboxes of :class:`tensorwire.calls.publishing.StreamLinks` (the
  trainer service's publishing code: one ``Publish`` stream per streamer
  address, latest-wins status and views, reconnects by itself);
- builds a view only while someone watches the run, at most ``max_fps`` a
  second and within ``view_cpu_budget`` of one CPU, in a worker thread;
- keeps the run registered with the trainer service (``RegisterRun``) and an
  ``AttachRun`` stream open: its status goes up (so ``ListRuns``/``GetRun`` and
  the browser show it like a built-in run), pause/stop/params come down.

A streamer or trainer that is down, slow or absent never stops training: the
links retry with backoff and catch up (scalars merged meanwhile). Connections
take credentials from ``token=`` or ``TENSORWIRE_TOKEN``/``TENSORWIRE_TOKEN_FILE``
and TLS from ``TENSORWIRE_TLS_CA`` (:meth:`tensorwire.rpc.auth.ClientSecurity.from_env`);
the token needs the publisher role.

Distributed training (``torch.distributed`` initialised): only rank 0 publishes;
``init`` on any other rank returns a run whose methods do nothing (``id`` is
empty, ``should_stop`` is False, ``params`` are the ones given). Broadcast a stop
from rank 0 yourself if every rank must see it.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import copy
import logging
import math
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc

from tensorwire import views as _views
from tensorwire.calls.backoff import Backoff
from tensorwire.calls.channels import ChannelPool
from tensorwire.calls.periodic import Periodic
from tensorwire.calls.publishing import StreamLinks, ViewPacer
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data.scalars import MAX_SERIES, Bucket, ScalarBuffer, bucketize
from tensorwire.rpc.auth import ClientSecurity, TokenSource
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc

log = logging.getLogger("tensorwire.track")

DEFAULT_STREAMER = "127.0.0.1:50052"
DEFAULT_TRAINER = "127.0.0.1:50051"
DEFAULT_INFERENCE = "127.0.0.1:8001"
TERMINAL = (cpb.RUN_STATE_STOPPED, cpb.RUN_STATE_FAILED, cpb.RUN_STATE_COMPLETED)
_END_STATES = {"completed": cpb.RUN_STATE_COMPLETED, "stopped": cpb.RUN_STATE_STOPPED,
               "failed": cpb.RUN_STATE_FAILED}
_GIVE_UP = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.UNIMPLEMENTED)
"""Answers of the trainer that retrying does not change: warned about (and retried slowly)."""
_TRAINER_BACKOFF = Backoff(initial_s=0.1, max_s=2.0, jitter=0.5)
_REFUSED_BACKOFF = Backoff(initial_s=5.0, max_s=5.0, jitter=0.5)
"""After a _GIVE_UP answer, until the link stays up a while."""


class SDKWarning(UserWarning):
    """Something a training script should know about, that does not stop its training."""


def _address(value: str | None, env: str, default: str) -> str:
    return os.environ.get(env, default) if value is None else value


def _rank() -> int:
    """This process's torch.distributed rank (0 when not distributed; torch not imported here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return int(dist.get_rank())


def init(
    task: str = "script",
    params: Mapping[str, float] | None = None,
    *,
    streamer: str | None = None,
    trainer: str | None = None,
    inference: str | None = None,
    token: str | None = None,
    run_id: str | None = None,
    max_fps: float = 5.0,
    view_cpu_budget: float = 0.05,
    tick_s: float = 0.05,
    max_points: int = 512,
) -> Run:
    """Start publishing a run; returns at once (nothing waits on the network).

    ``streamer``/``trainer``/``inference``: ``host:port`` (or a comma list /
    ``dns:///`` for the streamer), else ``TENSORWIRE_STREAMER``,
    ``TENSORWIRE_TRAINER``, ``TENSORWIRE_INFERENCE``, else the local suite's
    ports; ``""`` turns that connection off. ``params``: numbers, changeable live
    from the browser: ``run.params`` has the current values, and a dict passed
    here is updated in place too (one key at a time, from the background thread),
    so a script that reads its own ``params[...]`` every step follows the browser.
    ``token``: a bearer token with the publisher role (else from the environment).
    """
    values = dict(params or {})
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"params[{key!r}] must be a finite number, got {value!r}")
        values[key] = float(value)
    if _rank() != 0:
        return DisabledRun(values)
    shared = params if isinstance(params, dict) else None
    security = ClientSecurity.from_env()
    if token is not None:
        security = ClientSecurity(TokenSource(token), security.tls)
    return Run(
        task, values, streamer=_address(streamer, "TENSORWIRE_STREAMER", DEFAULT_STREAMER),
        trainer=_address(trainer, "TENSORWIRE_TRAINER", DEFAULT_TRAINER),
        inference=_address(inference, "TENSORWIRE_INFERENCE", DEFAULT_INFERENCE),
        security=security, run_id=run_id or uuid.uuid4().hex[:12], max_fps=max_fps,
        view_cpu_budget=view_cpu_budget, tick_s=tick_s, max_points=max_points, shared_params=shared,
    )


class _WatchedGrads:
    """A model's gradients for the ``watch`` view, copied on the thread that writes them.

    Reading ``p.grad`` from another thread while ``backward()`` runs is a data race
    inside torch (the autograd engine replaces the gradient without the GIL): it
    corrupted the heap and crashed the process. So the view's thread never reads
    them: after a view has taken the last copy, each parameter's next accumulated
    gradient is cloned by a hook in the backward pass (one clone per parameter per
    view, nothing on the other steps), and the view reads those clones. Weights are
    read as ``p.data`` (the tensor is never replaced, only updated in place)."""

    def __init__(self, model: Any) -> None:
        self.params = list(model.named_parameters())
        self._copies: list[Any] = [None] * len(self.params)
        self._wanted = [True] * len(self.params)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i))
                         for i, (_, p) in enumerate(self.params) if p.requires_grad]

    def _hook(self, i: int) -> Callable[[Any], None]:
        def copy_grad(param: Any) -> None:
            if self._wanted[i] and param.grad is not None:
                self._copies[i] = param.grad.detach().clone()
                self._wanted[i] = False
        return copy_grad

    def take(self) -> list[Any]:
        """The latest gradient copies (None: none yet); the next backward copies anew."""
        copies = list(self._copies)
        self._wanted = [True] * len(self.params)
        return copies

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Run:
    """One script's run: ``log``, ``view``, ``watch``, control, ``checkpoint``, ``finish``.

    Made by :func:`init`. Every method may be called from the training thread;
    none of them waits on the network (``finish`` waits a few seconds at most for
    the last points to go out).
    """

    def __init__(
        self,
        task: str,
        params: dict[str, float],
        *,
        streamer: str,
        trainer: str,
        inference: str,
        security: ClientSecurity | None,
        run_id: str,
        max_fps: float = 5.0,
        view_cpu_budget: float = 0.05,
        tick_s: float = 0.05,
        max_points: int = 512,
        status_interval_s: float = 0.25,
        finish_timeout_s: float = 5.0,
        shared_params: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < max_fps <= 60:
            raise ValueError(f"max_fps must be in (0, 60], got {max_fps}")
        self.id = run_id
        """The run id ListRuns/GetRun/Subscribe use."""
        self.task = task
        self.streamer, self.trainer, self.inference = streamer, trainer, inference
        self.security = security
        self.max_fps = max_fps
        self.view_cpu_budget = view_cpu_budget
        self.tick_s = tick_s
        self.status_interval_s = status_interval_s
        self.finish_timeout_s = finish_timeout_s
        self._params: Mapping[str, float] = MappingProxyType(dict(params))
        self._shared_params = shared_params
        # -- written by the training thread, read by the background thread --
        self._queue: collections.deque[tuple[int, float, dict[str, Any]]] = collections.deque()
        self._views: dict[str, Callable[[], Any]] = {}
        self._watched: list[_WatchedGrads] = []
        self._waiting_paused = False
        # -- written by the background thread, read by the training thread --
        self._paused = False
        self._stop = False
        self._resume = threading.Event()
        self._resume.set()
        # -- the background thread's own --
        self._scalars = ScalarBuffer(max_points)
        self._names: set[str] = set()
        self._dropped_names = 0
        self._step = 0
        self._produced_at = time.time()
        self._metrics: dict[str, float] = {}
        self._rate = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self._state: int = cpb.RUN_STATE_RUNNING
        self._error = ""
        self._notes: list[str] = []
        self._status_seq = 0
        self._status_sent_seq = -1
        self._published_seq = -1
        self._status_step = -1
        self._last_status_at = -math.inf
        self._status_wake: asyncio.Event | None = None
        self._pacer = ViewPacer(max_fps, view_cpu_budget)
        self._building: set[str] = set()
        self._failed_views: set[str] = set()
        self._warned: set[str] = set()
        self.registered = threading.Event()
        """Set once the trainer knows the run (tests and tools wait on it)."""
        self._finished = False
        self._final_delivered = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._streams: StreamLinks | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._collector: Periodic | None = None
        self._thread = threading.Thread(target=self._thread_main, name=f"tensorwire-{run_id}", daemon=True)
        self._thread.start()
        self._started.wait()
        atexit.register(self._at_exit)

    def __repr__(self) -> str:
        return f"<tensorwire.Run {self.id} task={self.task!r} step={self._step} " \
               f"state={cpb.RunState.Name(self._state)}>"

    def __enter__(self) -> Run:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, KeyboardInterrupt):
            self.finish("stopped" if self._stop or exc is not None else "completed")
        else:
            self.finish("failed", error=f"{type(exc).__name__}: {exc}")

    # -- the hot path (training thread) -------------------------------------
    def log(self, step: int, **scalars: Any) -> None:
        """Record scalars of ``step`` (floats, ints, or 0-d tensors read later off
        this thread: pass fresh tensors, not one you modify in place afterwards)."""
        self._queue.append((step, time.time(), scalars))

    def view(self, name: str, fn: Callable[[], Any]) -> None:
        """Show what ``fn()`` returns as the view ``name``: a View (tensorwire.views), or
        values: [T] a line, [N, 2] a scatter, [N, H, W] / [N, C, H, W] an image grid.
        ``fn`` runs in a background thread, only while someone watches, at most
        ``max_fps`` a second; one that raises is reported once and disabled."""
        if self._views.get(name) is not fn:
            self._views[name] = fn

    def watch(self, model: Any, *, name: str = "weights", bins: int = _views.HISTOGRAM_BINS) -> None:
        """Per-layer weight and gradient histograms of ``model`` (an nn.Module) as a view.
        The gradients are copied in the backward pass (:class:`_WatchedGrads`), never
        read from the view's thread."""
        grads = _WatchedGrads(model)
        self._watched.append(grads)

        def histograms() -> cpb.View:
            layers = [(n, p.data, grad) for (n, p), grad in zip(grads.params, grads.take())]
            return _views.histograms(layers, bins=bins, name=name)

        self.view(name, histograms)

    @property
    def params(self) -> Mapping[str, float]:
        """The run's hyper-parameters now (UpdateRun from the browser changes them)."""
        return self._params

    @property
    def should_stop(self) -> bool:
        """True once Stop was pressed: leave the training loop and ``finish``."""
        return self._stop

    @property
    def paused(self) -> bool:
        return self._paused

    def wait_if_paused(self, timeout_s: float | None = None) -> bool:
        """While the run is paused from the browser, wait (until resumed or stopped).
        Returns True when it waited."""
        if not self._paused:
            return False
        self._waiting_paused = True
        try:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while self._paused and not self._stop:
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    break
                self._resume.wait(left)
        finally:
            self._waiting_paused = False
        return True

    # -- checkpoints ----------------------------------------------------------
    def checkpoint(
        self,
        model: Any,
        *,
        name: str | None = None,
        inputs: Any,
        directory: str | os.PathLike[str] | None = None,
        push: bool = True,
    ) -> concurrent.futures.Future[Any]:
        """Export ``model`` with example ``inputs`` into a Triton model repository
        folder, push it to inference (chunked upload, with its config.pbtxt) and have
        inference load it, in the background.

        A copy of the model is taken here (so training may go on changing it); the
        export (torch.export, else TorchScript tracing) and upload run in the
        background thread. Returns a future of the
        :class:`tensorwire.export.ExportedModel` (``.result()`` waits for it).
        """
        from tensorwire import export

        model_name = name or self.task
        export.check_model_name(model_name)
        frozen = copy.deepcopy(model).eval()
        example = export.detached(inputs)
        folder = Path(directory) if directory is not None else export.default_directory()

        async def work() -> Any:
            exported = await asyncio.to_thread(export.export_model, frozen, example, folder, model_name)
            if push and self.inference:
                try:
                    exported.pushed_version = await export.push(
                        exported, self.inference, security=self.security
                    )
                except Exception as exc:
                    self._warn_once(f"push {model_name}",
                                    f"checkpoint {model_name!r} was exported to {exported.folder} but "
                                    f"is not served by inference at {self.inference}: {exc}")
            return exported

        return asyncio.run_coroutine_threadsafe(work(), self._loop)

    # -- the end ----------------------------------------------------------------
    def finish(self, state: str = "completed", *, error: str = "") -> None:
        """End the run (``completed``, ``stopped`` or ``failed``): the last points and
        status go out (waiting ``finish_timeout_s`` at most), then the thread ends."""
        if state not in _END_STATES:
            raise ValueError(f"state must be one of {', '.join(_END_STATES)}, got {state!r}")
        with self._lock:
            if self._finished:
                return
            self._finished = True
        if state == "completed" and self._stop:
            state = "stopped"
        future = asyncio.run_coroutine_threadsafe(self._finish(_END_STATES[state], error), self._loop)
        try:
            future.result(self.finish_timeout_s + 5.0)
        except Exception:
            log.warning("run %s: finishing took too long; some updates may not have gone out", self.id)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        atexit.unregister(self._at_exit)
        for watched in self._watched:  # the model trains on without our hooks
            watched.remove()

    def _at_exit(self) -> None:
        if not self._finished:
            self.finish("stopped" if self._stop else "completed")

    # -- the background thread ----------------------------------------------
    def _thread_main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._aclose())
            # Not closed: gRPC's completion queue may still post a callback to it.

    async def _start(self) -> None:
        self._status_wake = asyncio.Event()
        self._streams = StreamLinks(
            self.streamer, security=self.security, max_points=self._scalars.max_points,
            on_watched=lambda _: self._pacer.wake_all(), on_refused=self._refused,
        )
        self._tasks = [asyncio.create_task(self._start_streams(), name="sdk-streams")]
        self._collector = Periodic(self._collect_now, self.tick_s, name=f"run {self.id}: collecting updates",
                                   immediately=True).start()
        if self.trainer:
            self._tasks.append(asyncio.create_task(self._control_forever(), name="sdk-control"))

    async def _start_streams(self) -> None:
        assert self._streams is not None
        await self._streams.start()

    async def _aclose(self) -> None:
        if self._collector is not None:
            await self._collector.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._streams is not None:
            await self._streams.aclose()

    async def _finish(self, state: int, error: str) -> None:
        self.collect()
        self._state = state
        self._error = error or self._error
        self._paused = False
        self._resume.set()
        self._bump_status()
        self.collect()
        deadline = time.monotonic() + self.finish_timeout_s
        while time.monotonic() < deadline:
            if self._flushed():
                return
            await asyncio.sleep(0.02)

    def _flushed(self) -> bool:
        streams = self._streams
        trainer_done = not self.trainer or not self.registered.is_set() or self._final_delivered
        if streams is None or not streams.links or not streams.connected:
            return trainer_done
        idle = all(not (link.pending_status or link.scalars_ready()) for link in streams.links.values())
        return trainer_done and idle

    async def _collect_now(self) -> None:
        self.collect()

    def collect(self) -> None:
        """One tick (background thread): scalars, status, views."""
        now = time.monotonic()
        series = self._drain()
        streams = self._streams
        if series and streams is not None:
            streams.publish_scalars(self.id, series)
        if now - self._rate_mark[0] >= 0.5:
            then, step = self._rate_mark
            self._rate = max(0.0, (self._step - step) / (now - then))
            self._rate_mark = (now, self._step)
        state = self._state
        if state not in TERMINAL:
            state = cpb.RUN_STATE_PAUSED if self._paused and self._waiting_paused else cpb.RUN_STATE_RUNNING
            if state != self._state:
                self._state = state
                self._bump_status()
        if now - self._last_status_at >= self.status_interval_s and self._step != self._status_step:
            self._bump_status()
        if self._status_seq != self._published_seq:
            self._published_seq = self._status_seq
            self._last_status_at = now
            self._status_step = self._step
            if streams is not None:
                msg = spb.PublishRequest(run_id=self.id, step=self._step, produced_at=self._produced_at,
                                         status=self.status_message())
                streams.publish_status(self.id, msg.SerializeToString())
            if self._status_wake is not None:
                self._status_wake.set()
        if streams is not None and self._views and streams.watchers(self.id):
            self._maybe_build_views(now)

    def _drain(self) -> dict[str, list[Bucket]]:
        """Every point logged since the last tick, as buckets per name (bounded)."""
        queue = self._queue
        if not queue:
            return {}
        names = self._names
        points: dict[str, tuple[list[int], list[float]]] = {}
        while queue:
            step, produced_at, values = queue.popleft()
            for key, value in values.items():
                entry = points.get(key)
                if entry is None:
                    if key not in names:
                        if len(names) >= MAX_SERIES:
                            self._dropped_names += 1
                            self._warn_once("names", f"run {self.id}: more than {MAX_SERIES} distinct "
                                                     f"scalar names; {key!r} and later new names are "
                                                     "not published")
                            continue
                        names.add(key)
                    entry = points[key] = ([], [])
                try:
                    number = float(value.detach() if hasattr(value, "detach") else value)
                except (TypeError, ValueError, RuntimeError) as exc:
                    self._warn_once(f"value {key}", f"run {self.id}: scalar {key!r} is not a number "
                                                    f"({type(value).__name__}: {exc}); left out")
                    continue
                entry[0].append(step)
                entry[1].append(number)
            self._step = max(self._step, step)
            self._produced_at = produced_at
        max_points = self._scalars.max_points
        out = {}
        for key, (steps, numbers) in points.items():
            if steps:
                self._metrics[key] = numbers[-1]
                out[key] = bucketize(steps, numbers, max_points)
        return out

    def status_message(self) -> cpb.RunStatus:
        error = self._error or "; ".join(self._notes)
        return cpb.RunStatus(
            run_id=self.id, task=self.task, state=self._state, step=self._step,  # type: ignore[arg-type]  # protobuf enum fields take their int values
            steps_per_second=0.0 if self._state in TERMINAL else self._rate,
            produced_at=self._produced_at, metrics=self._metrics, params=dict(self._params),
            error=error,
        )

    def _bump_status(self) -> None:
        self._status_seq += 1

    # -- views ----------------------------------------------------------------
    def _maybe_build_views(self, now: float) -> None:
        assert self._streams is not None
        demand = self._streams.demand_fps(self.id)
        for name, fn in list(self._views.items()):
            if name in self._failed_views or name in self._building or not self._pacer.due(name, now):
                continue
            self._pacer.started(name, now, demand)
            self._building.add(name)
            task = asyncio.create_task(self._build_view(name, fn), name=f"sdk-view-{name}")
            task.add_done_callback(lambda _, n=name: self._building.discard(n))  # type: ignore[misc]

    async def _build_view(self, name: str, fn: Callable[[], Any]) -> None:
        step, produced_at = self._step, self._produced_at

        def build() -> tuple[cpb.View, float]:
            started = time.thread_time()
            view = _views.as_view(fn(), name)
            return view, time.thread_time() - started

        try:
            view, cost = await asyncio.to_thread(build)
        except Exception as exc:
            self._failed_views.add(name)
            note = f"view {name!r} disabled: {type(exc).__name__}: {exc}"
            self._notes.append(note[:300])
            self._bump_status()
            self._warn_once(f"view {name}", f"run {self.id}: {note}")
            return
        self._pacer.cost(name, cost)
        view.step = view.step or step
        view.produced_at = view.produced_at or produced_at
        data = spb.PublishRequest(run_id=self.id, step=view.step, produced_at=view.produced_at, view=view)
        assert self._streams is not None
        self._streams.publish_view((self.id, view.name or view.kind), data.SerializeToString())

    # -- the trainer --------------------------------------------------------
    async def _control_forever(self) -> None:
        pool = ChannelPool(self.trainer, min_size=1, max_size=1, name=f"sdk trainer {self.trainer}",
                           security=self.security)
        failures, refused = 0, False
        try:
            while True:
                started = time.monotonic()
                try:
                    async with pool.acquire() as channel:
                        await self._attach(tpb_grpc.TrainerServiceStub(channel))
                    if self._state in TERMINAL:
                        return
                except asyncio.CancelledError:
                    raise
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in _GIVE_UP:
                        self._warn_once(f"trainer {exc.code().name}",
                                        f"run {self.id}: the trainer at {self.trainer} refused the run: "
                                        f"{exc.code().name}: {exc.details()}")
                        refused = True
                    else:
                        log.debug("run %s: trainer link: %s %s", self.id, exc.code().name, exc.details())
                except Exception as exc:
                    log.debug("run %s: trainer link failed: %s", self.id, exc)
                if time.monotonic() - started > 5.0:
                    failures, refused = 0, False  # it was up a while: this is a new outage
                failures += 1
                await (_REFUSED_BACKOFF if refused else _TRAINER_BACKOFF).sleep(failures)
        finally:
            await pool.aclose()

    async def _attach(self, stub: tpb_grpc.TrainerServiceStub) -> None:
        await stub.RegisterRun(
            tpb.RegisterRunRequest(run_id=self.id, task=self.task, params=dict(self._params)),
            timeout=10.0,
        )
        self.registered.set()
        assert self._status_wake is not None
        wake = self._status_wake

        async def statuses() -> Any:
            first = True
            while True:
                seq = self._status_seq
                yield tpb.AttachRunRequest(run_id=self.id if first else "", status=self.status_message())
                first = False
                self._status_sent_seq = seq
                if self._state in TERMINAL:
                    return
                wake.clear()
                if self._status_seq == seq:
                    await wake.wait()

        call = stub.AttachRun(statuses())
        async for control in call:
            self._apply(control)
        # The trainer ends the stream once ours ended: after the final status.
        if self._state in TERMINAL and self._status_sent_seq >= self._status_seq:
            self._final_delivered = True

    def _apply(self, control: tpb.AttachRunResponse) -> None:
        if dict(control.params) and dict(control.params) != dict(self._params):
            self._params = MappingProxyType({**self._params, **control.params})
            if self._shared_params is not None:  # the script's own dict follows too
                for key, value in control.params.items():
                    if self._shared_params.get(key) != value:
                        old = self._shared_params.get(key)
                        self._shared_params[key] = int(value) if isinstance(old, int) and value == int(value) else value
            self._bump_status()
        self._stop = self._stop or control.stop
        self._paused = control.paused and not self._stop
        if self._paused:
            self._resume.clear()
        else:
            self._resume.set()

    # -- warnings -------------------------------------------------------------
    def _refused(self, exc: grpc.aio.AioRpcError) -> None:
        self._warn_once("refused", f"run {self.id}: the streamer refused an update: {exc.details()}")

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning("%s", message)
        warnings.warn(message, SDKWarning, stacklevel=2)


class DisabledRun(Run):
    """What ``init`` returns on a torch.distributed rank other than 0: every call
    does nothing (rank 0 publishes the run)."""

    def __init__(self, params: dict[str, float]) -> None:
        self.id = ""
        self.task = ""
        self._params = MappingProxyType(dict(params))
        self._stop = False
        self._paused = False

    def __repr__(self) -> str:
        return "<tensorwire.DisabledRun (not rank 0)>"

    def log(self, step: int, **scalars: Any) -> None:
        return None

    def view(self, name: str, fn: Callable[[], Any]) -> None:
        return None

    def watch(self, model: Any, *, name: str = "weights", bins: int = _views.HISTOGRAM_BINS) -> None:
        return None

    def wait_if_paused(self, timeout_s: float | None = None) -> bool:
        return False

    def checkpoint(self, model: Any, *, name: str | None = None, inputs: Any,
                   directory: str | os.PathLike[str] | None = None,
                   push: bool = True) -> concurrent.futures.Future[Any]:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        done.set_result(None)
        return done

    def finish(self, state: str = "completed", *, error: str = "") -> None:
        return None
