"""RunManager: owns the training runs (plain Python, no gRPC)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    description: str


class RunManager:
    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}

    def list_tasks(self) -> list[TaskSpec]:
        return list(self._tasks.values())

    def list_runs(self) -> list[object]:
        return []

    async def aclose(self) -> None:
        return None
