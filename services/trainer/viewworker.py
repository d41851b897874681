"""Where views are rendered: a worker process (no GIL shared with training) or a thread.

In the trainer's own process every torch call of a view build would release and
retake the GIL while the training thread does the same, and each hand-over can
cost the training thread a switch interval. A separate process costs training
only the CPU time the view takes, which the publisher caps with
``view_cpu_budget``. The worker rebuilds a run's data from (task, config, seed)
(every task's data is seeded) and keeps a model per run, so a request carries
only the weight snapshot.

But a process costs a CPU of its own: :func:`view_process` (``--view-renderer``)
picks it when the trainer may use 2 CPUs or more, and the thread otherwise.

``draw`` is the one view renderer: the worker's ``render`` and the in-process
fallback (``LocalRenderer``, no worker) both call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import multiprocessing.process
import os
import pickle
import socket
import struct
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

_CACHE: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
_CACHE_RUNS = 16
_SET_UP: OrderedDict[str, None] = OrderedDict()
"""Runs whose model and data this worker has set up once (see ``render``)."""
_SET_UP_KEPT = 4096
_TASKS: dict[str, Any] = {}


def _init(task_modules: tuple[str, ...] = ()) -> None:
    import torch

    torch.set_num_threads(1)
    from services.trainer.plugins import load_tasks
    from services.trainer.tasks import TASKS

    plugins, _ = load_tasks(task_modules, taken=TASKS)  # the trainer reported any failure
    _TASKS.update(TASKS)
    _TASKS.update(plugins)


_STATE: weakref.WeakKeyDictionary[Any, list[tuple[str, Any]]] = weakref.WeakKeyDictionary()


def _state_tensors(model: Any) -> list[tuple[str, Any]]:
    """``model``'s state tensors (sharing its storage), listed once per model: a view
    copies a snapshot into them, and ``state_dict()`` walking the module tree cost
    ~0.1-0.2 ms of each cold spiral view's ~1 ms."""
    tensors = _STATE.get(model)
    if tensors is None:
        tensors = _STATE[model] = list(model.state_dict().items())
    return tensors


def draw(task: Any, model: Any, data: Any, config: Any, state_dict: dict[str, Any],
         step: int, produced_at: float) -> Any:
    """``task``'s View of ``model`` holding ``state_dict`` (copied into it in place:
    cheaper than load_state_dict, same effect) over ``data``, stamped with ``step``."""
    import torch

    with torch.no_grad():
        for name, tensor in _state_tensors(model):
            tensor.copy_(state_dict[name])
    with torch.inference_mode():
        view = task.build_view(model, data, config)
    view.step = step
    view.produced_at = produced_at
    return view


def render(
    run_id: str, task_name: str, config: Any, seed: int, state_dict: dict[str, Any],
    step: int, produced_at: float,
) -> tuple[bytes, float]:
    """The serialized View of ``state_dict`` and the CPU seconds it took (in the worker;
    a run's first model and data set-up not counted: the budget paces the views that
    follow, and a first view's cost held the next ones; a set-up again, after more
    than ``_CACHE_RUNS`` watched runs evicted it, is)."""
    if not _TASKS:  # called in this process (tests), not in a worker
        from services.trainer.tasks import TASKS

        _TASKS.update(TASKS)
    task = _TASKS[task_name]
    started = time.process_time()
    entry = _CACHE.get(run_id)
    if entry is None:
        model = task.build_model(config).eval()
        entry = _CACHE[run_id] = (model, task.make_data(config, seed))
        while len(_CACHE) > _CACHE_RUNS:
            _CACHE.popitem(last=False)
        if run_id not in _SET_UP:  # the first time only: one evicted and built again is charged
            _SET_UP[run_id] = None
            while len(_SET_UP) > _SET_UP_KEPT:
                _SET_UP.popitem(last=False)
            started = time.process_time()
    _CACHE.move_to_end(run_id)
    model, data = entry
    import torch

    view = draw(task, model, data, config, {k: torch.as_tensor(v) for k, v in state_dict.items()}, step,
                produced_at)
    return view.SerializeToString(), time.process_time() - started


class LocalRenderer:
    """Renders in this process (no worker): the run's live data, a model per run."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}

    def render(self, run_id: str, task: Any, data: Any, snap: Any) -> tuple[Any, float]:
        """(thread) The View of ``snap`` (a trainer Snapshot) and the CPU seconds it took
        (the run's one-time model set-up not counted, as in :func:`render`)."""
        model = self._models.get(run_id)
        if model is None:
            model = self._models[run_id] = task.build_model(snap.config)
            model.eval()
        started = time.thread_time()
        view = draw(task, model, data, snap.config, snap.state_dict, snap.step, snap.produced_at)
        return view, time.thread_time() - started

    def forget(self, run_id: str) -> None:
        self._models.pop(run_id, None)


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> float:
    """CPUs this process may run on: its affinity mask (all CPUs where there is none),
    capped by the lowest cgroup CPU quota on its way to the root (a Kubernetes CPU
    limit: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``)."""
    affinity = getattr(os, "sched_getaffinity", None)
    count = float(len(affinity(0)) if affinity else os.cpu_count() or 1)
    quota = _cgroup_quota(root)
    return min(count, quota) if quota else count


def _cgroup_quota(root: Path, own: str | None = None) -> float | None:
    """The lowest CPU quota (CPUs) of the cgroup ``own`` (v2, under ``root``; default:
    this process's) and its parents, None without one."""
    quotas: list[float] = []
    if own is None:
        own = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                if line.startswith("0::"):
                    own = line[3:].strip("/")
    parts = [part for part in own.split("/") if part]
    for depth in range(len(parts), -1, -1):  # v2: this cgroup up to the root
        with contextlib.suppress(OSError, ValueError):
            limit, period = (root.joinpath(*parts[:depth]) / "cpu.max").read_text().split()[:2]
            if limit != "max":
                quotas.append(int(limit) / int(period))
    with contextlib.suppress(OSError, ValueError):  # v1, as a container sees it
        limit_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if limit_us > 0:
            quotas.append(limit_us / period_us)
    return min(quotas, default=None)


def view_process(renderer: str, cpus: float | None = None) -> bool:
    """Whether views render in a worker process (``--view-renderer``). ``auto``: when
    this process may use 2 CPUs or more (``cpus``, else :func:`usable_cpus`).
    Measured (per-thread schedstat over on/off pairs, spiral, 20 views a second, an
    unthrottled viewer): with 2 CPUs the training thread blocks on the GIL about 450
    more times a second beside a render thread and 150 beside the process, and keeps
    96.0 % of a CPU instead of 95.2 %; pinned to one CPU, the process's own CPU and
    context switches come out of training's (94.2 % against 95.2 % with the thread)."""
    if renderer != "auto":
        return renderer == "process"
    return (usable_cpus() if cpus is None else cpus) >= 2


def _portable(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (a snapshot's private CPU copies) with numpy arrays for the
    tensors numpy can hold: they pickle as plain bytes. A torch tensor pickled for
    another process (torch's multiprocessing reduction, what a ProcessPoolExecutor's
    queue used) gets a new shared-memory segment and a file descriptor sent over a
    socket each: 2.2-2.7 ms of the trainer's CPU per spiral view (six tensors),
    against 0.4-0.5 ms as arrays through the same pool. A dtype numpy lacks
    (bfloat16) stays a tensor (plain pickling copies its bytes)."""
    out: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        try:
            out[name] = tensor.numpy()
        except (TypeError, RuntimeError):
            out[name] = tensor
    return out


_HEADER = struct.Struct("<Q")
RENDER_TIMEOUT_S = 60.0
"""A render the worker has not answered by then counts as a hung worker: it is killed
(the next render starts a new one), so one stuck view cannot stop every run's views."""


def _frame(message: object) -> tuple[bytes, bytes]:
    """A message on the worker's socket: its length, then its pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)), payload


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _serve(sock: socket.socket, task_modules: tuple[str, ...]) -> None:
    """The worker process: render each request in turn until the trainer's end of
    the socket closes (the trainer stopped or died). A request is (id, pickled
    arguments): arguments it cannot even unpickle fail that render, not the worker."""
    _init(task_modules)
    while True:
        header = _recv_exactly(sock, _HEADER.size)
        body = _recv_exactly(sock, _HEADER.unpack(header)[0]) if header is not None else None
        if body is None:
            return
        request_id, blob = pickle.loads(body)
        try:
            args = pickle.loads(blob)
            reply: tuple[Any, ...] = (request_id, True, render(*args) if args is not None else None)
        except Exception as exc:  # a task's view bug fails that view, not the worker
            reply = (request_id, False, f"{type(exc).__name__}: {exc}")
        sock.sendall(b"".join(_frame(reply)))


class ViewWorkerDied(RuntimeError):
    """The view worker process exited (or hung) with renders outstanding; the next
    render starts a new one."""


class _Connection:
    """One worker process and the trainer's end of its socket."""

    def __init__(self, process: multiprocessing.process.BaseProcess, writer: asyncio.StreamWriter) -> None:
        self.process = process
        self.writer = writer
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.reader: asyncio.Task[None] | None = None

    def end(self, error: BaseException) -> None:
        """Kill the process (if alive), close the socket, fail what it still owes."""
        if self.process.is_alive():
            self.process.kill()
        self.writer.close()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()


class ViewWorker:
    """One worker process (started on first use, restarted if it dies or hangs), fed
    over a socket pair by the event loop itself: a view costs the trainer a pickle of
    the snapshot's arrays, one write and one read on the loop, and no thread of its
    own (a ProcessPoolExecutor adds a management and a feeder thread, each waking
    per call and each taking the GIL the training thread wants)."""

    def __init__(self, task_modules: tuple[str, ...] = ()) -> None:
        self._task_modules = tuple(task_modules)
        self._conn: _Connection | None = None
        self._starting: asyncio.Lock | None = None
        self._ids = itertools.count()
        self._closed = False

    @property
    def _process(self) -> multiprocessing.process.BaseProcess | None:
        return self._conn.process if self._conn is not None else None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ViewWorkerDied("the view worker is closed")
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:  # renders arriving while it starts share one process
            if self._conn is not None:
                return self._conn
            ours, theirs = socket.socketpair()
            try:
                process = multiprocessing.get_context("spawn").Process(
                    target=_serve, args=(theirs, self._task_modules), name="tensorwire-views", daemon=True)
                process.start()
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            try:
                reader, writer = await asyncio.open_connection(sock=ours)
            except BaseException:
                ours.close()
                process.kill()
                raise
            conn = self._conn = _Connection(process, writer)
            conn.reader = asyncio.create_task(self._read(conn, reader), name="view-worker-replies")
            return conn

    async def _read(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        error: BaseException = ViewWorkerDied("the view worker process exited")
        try:
            while True:
                header = await reader.readexactly(_HEADER.size)
                request_id, ok, result = pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))
                future = conn.pending.pop(request_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(result)
                else:
                    future.set_exception(RuntimeError(f"view render failed: {result}"))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            error = ViewWorkerDied(f"the view worker process exited ({exc})")
        except asyncio.CancelledError:
            error = ViewWorkerDied("the view worker was closed")
            raise
        finally:
            self._drop(conn, error)

    def _drop(self, conn: _Connection, error: BaseException) -> None:
        if self._conn is conn:  # the next render starts a new worker
            self._conn = None
        conn.end(error)

    async def warm_up(self) -> None:
        """Start the worker and wait until it has imported torch and the tasks."""
        await self._call(None)

    async def render(self, run_id: str, task_name: str, config: Any, seed: int, state_dict: dict[str, Any],
                     step: int, produced_at: float) -> tuple[bytes, float]:
        """:func:`render` in the worker: (the serialized View, its CPU seconds there).
        Raises ViewWorkerDied if the worker exits or hangs first, RuntimeError if the
        view fails."""
        result: tuple[bytes, float] = await self._call(
            (run_id, task_name, config, seed, _portable(state_dict), step, produced_at))
        return result

    async def _call(self, args: tuple[Any, ...] | None) -> Any:
        """One request to the worker (None: an empty one, answered once it is ready)."""
        blob = pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)
        conn = await self._connect()
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.pending[request_id] = future
        try:
            conn.writer.writelines(_frame((request_id, blob)))
            return await asyncio.wait_for(future, RENDER_TIMEOUT_S)
        except TimeoutError:
            hung = ViewWorkerDied(f"the view worker did not answer in {RENDER_TIMEOUT_S:g} s")
            self._drop(conn, hung)
            raise hung from None
        finally:
            conn.pending.pop(request_id, None)

    def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.reader is not None:
                conn.reader.cancel()
            conn.end(ViewWorkerDied("the view worker was closed"))
