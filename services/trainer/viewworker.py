"""Views are rendered in a worker process, so they never take the GIL from training.

In the trainer's own process every torch call of a view build would release and
retake the GIL while the training thread does the same, and each hand-over can
cost the training thread a switch interval. A separate process costs training
only the CPU time the view takes, which the publisher caps with
``view_cpu_budget``. The worker rebuilds a run's data from (task, config, seed)
(every task's data is seeded) and keeps a model per run, so a request carries
only the weight snapshot.

``draw`` is the one view renderer: the worker's ``render`` and the in-process
fallback (``LocalRenderer``, no worker) both call it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time
import weakref
from collections import OrderedDict
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
    view = draw(task, model, data, config, state_dict, step, produced_at)
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


def _warm() -> bool:
    return True


class ViewWorker:
    """One worker process (started on first use, restarted if it dies)."""

    def __init__(self, task_modules: tuple[str, ...] = ()) -> None:
        self._task_modules = tuple(task_modules)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _get(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                initargs=(self._task_modules,),
            )
        return self._pool

    async def warm_up(self) -> None:
        await asyncio.wrap_future(self._get().submit(_warm))

    async def render(self, *args: Any) -> tuple[bytes, float]:
        try:
            return await asyncio.wrap_future(self._get().submit(render, *args))
        except concurrent.futures.BrokenExecutor:
            self._pool = None  # the worker died: the next view starts a new one
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
