"""The task registry: each task is data + model + loss + live view (see base.py)."""

from __future__ import annotations

from .anomaly import AnomalyTask
from .base import COMMON_PARAMS, Option, Param, RunConfig, Task
from .detection import DetectionTask
from .fusion import FusionTask
from .spiral import SpiralTask
from .trajectory import TrajectoryTask

TASKS: dict[str, Task] = {
    t.name: t
    for t in (SpiralTask(), TrajectoryTask(), AnomalyTask(), FusionTask(), DetectionTask())
}
"""Every task the trainer can run, by name."""

__all__ = ["COMMON_PARAMS", "TASKS", "Option", "Param", "RunConfig", "Task"]
