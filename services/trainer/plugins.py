"""Task plugins: user tasks (``tensorwire.tasks.Task`` subclasses) the trainer loads at start.

Two sources, both optional:

- ``--task-module PATH_OR_MODULE`` (repeatable; env ``TENSORWIRE_TRAINER_TASK_MODULES``,
  comma-separated): a ``.py`` file or an importable module name;
- the Python entry-point group ``tensorwire.tasks`` of installed packages
  (``[project.entry-points."tensorwire.tasks"] digits = "my_pkg.tasks:DigitsTask"``).

What a source gives: a ``TASKS`` sequence (or dict) of Task instances if the module
has one, else every concrete Task subclass the module defines (instantiated with no
arguments); an entry point may also name one Task subclass or instance directly.

A source that fails (an import error, a syntax error, a task whose defaults do not
validate, a name a built-in task has already) is reported with the file (and line)
and the error, and the trainer starts with the others.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tensorwire.tasks import Task

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tensorwire.tasks"


@dataclass(frozen=True)
class PluginError:
    """A task source that could not be used, and why."""

    source: str
    """The file (with the line where known), module or entry point."""
    error: str

    def __str__(self) -> str:
        return f"{self.source}: {self.error}"


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or Path(spec).exists()


def _where(exc: BaseException, path: Path | None) -> str:
    """``file:line`` of the innermost frame in the plugin's own file (else the last frame)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if path is not None and Path(f.filename).resolve() == path.resolve()]
    chosen = own or list(frames)
    if not chosen:
        return str(path) if path is not None else "?"
    return f"{chosen[-1].filename}:{chosen[-1].lineno}"


def _import(spec: str) -> tuple[ModuleType, Path | None]:
    if not _is_path(spec):
        module = importlib.import_module(spec)
        file = getattr(module, "__file__", None)
        return module, Path(file) if file else None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    name = f"tensorwire_task_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module, path


def tasks_of(obj: Any) -> list[Task]:
    """The Task instances a module, class, instance or TASKS collection stands for."""
    if isinstance(obj, Task):
        return [obj]
    if inspect.isclass(obj):
        if not issubclass(obj, Task):
            raise TypeError(f"{obj.__qualname__} is not a subclass of tensorwire.tasks.Task")
        return [obj()]
    if isinstance(obj, ModuleType):
        found = getattr(obj, "TASKS", None)
        if found is None:
            found = [c for _, c in inspect.getmembers(obj, inspect.isclass)
                     if issubclass(c, Task) and c.__module__ == obj.__name__ and not inspect.isabstract(c)]
            if not found:
                raise TypeError("it defines no TASKS and no Task subclass")
        return [t for item in (found.values() if isinstance(found, Mapping) else found) for t in tasks_of(item)]
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return [t for item in obj for t in tasks_of(item)]
    raise TypeError(f"{type(obj).__name__} is not a Task, a Task subclass or a module of tasks")


def _check(task: Task) -> None:
    if not isinstance(getattr(task, "name", None), str) or not task.name:
        raise TypeError(f"{type(task).__qualname__} has no name")
    task.configure()  # its defaults must validate


def load_tasks(
    modules: Sequence[str] = (),
    *,
    taken: Iterable[str] = (),
    entry_points: bool = True,
) -> tuple[dict[str, Task], list[PluginError]]:
    """Plugin tasks by name, and the sources that failed. ``taken``: names already used."""
    used = set(taken)
    tasks: dict[str, Task] = {}
    errors: list[PluginError] = []

    def add(source: str, obj_loader: Any, path: Path | None = None) -> None:
        try:
            found = tasks_of(obj_loader())
            for task in found:
                _check(task)
        except Exception as exc:  # any failure of user code: report it, start anyway
            where = _where(exc, path) if exc.__traceback__ is not None else source
            errors.append(PluginError(source if where in ("?", source) else f"{source} ({where})",
                                      f"{type(exc).__name__}: {exc}"))
            return
        for task in found:
            if task.name in used:
                errors.append(PluginError(source, f"task name {task.name!r} is taken already"))
                continue
            used.add(task.name)
            tasks[task.name] = task

    for spec in modules:
        path = Path(spec).expanduser() if _is_path(spec) else None
        add(spec, lambda s=spec: _import(s)[0], path)
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            add(f"entry point {ep.name} = {ep.value}", ep.load)
    for error in errors:
        log.error("task plugin not loaded: %s", error)
    if tasks:
        log.info("task plugins: %s", ", ".join(sorted(tasks)))
    return tasks, errors
