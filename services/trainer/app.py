"""Wiring of the trainer service: runs + publisher + announcer + servicer + server."""

from __future__ import annotations

import asyncio
import logging

import grpc
import torch

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.errors import TensorwireError
from tensorwire.rpc.rpcnames import service_name
from tensorwire.serving import modelrepo
from tensorwire.serving.devices import resolve_device
from tensorwire.trainer.v1 import trainer_pb2 as pb
from tensorwire.trainer.v1 import trainer_pb2_grpc as pb_grpc

from .announce import ModelAnnouncer
from .plugins import load_tasks
from .publisher import Publisher
from .runs import RunManager
from .servicer import TrainerServicer
from .settings import TrainerSettings
from .store import open_store
from .tasks import TASKS
from .viewworker import usable_cpus, view_process

log = logging.getLogger(__name__)

SERVICE_NAME = service_name(pb, "TrainerService")

DEMO_MODELS = {"trajectory": 1500, "anomaly": 1500, "fusion": 1500, "detection": 300}
"""Models every demo needs in the repository, and how many steps to train each."""


class TrainerApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        torch.set_num_threads(settings.torch_threads)
        plugins, self.plugin_errors = load_tasks(settings.task_module, taken=TASKS)
        self.runs = RunManager(
            settings.model_repository,
            checkpoint_every_steps=settings.checkpoint_every_steps,
            checkpoint_every_s=settings.checkpoint_every_s,
            keep_checkpoints=settings.keep_checkpoints,
            max_active_runs=settings.max_active_runs,
            tasks={**TASKS, **plugins},
            device=resolve_device(settings.device, settings.env_prefix),
            store=open_store(settings.run_store, settings.data_path / "runs.sqlite3"),
            state_dir=settings.data_path / "state",
            keep_runs=settings.keep_runs,
        )
        security = settings.client_security()
        self.announcer = ModelAnnouncer(settings.inference_target,
                                        repository=settings.model_repository,
                                        push=settings.push_checkpoints, security=security)
        self.runs.listeners.append(self.announcer.announce)
        cpus = usable_cpus()
        in_process = view_process(settings.view_renderer, cpus)
        log.info("views render in a %s (--view-renderer %s; %g CPUs usable)",
                 "worker process" if in_process else "thread", settings.view_renderer, cpus)
        self.publisher = Publisher(
            self.runs, settings.streamer_target, max_fps=settings.max_fps,
            view_cpu_budget=settings.view_cpu_budget, view_process=in_process,
            task_modules=settings.task_module,
            security=security,
        )
        self.runs.release_listeners.append(self.publisher.forget)
        self.runs.release_checks.append(self.publisher.final_sent)
        self.demo_run_id: str | None = None
        self._bootstrap: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.announcer.start()
        await self.publisher.start()
        self.runs.start()
        task = self.settings.demo_task
        if task:
            self.demo_run_id = await self.start_demo(task)
        if task and self.settings.demo_models:
            self._bootstrap = asyncio.create_task(self.prime_repository(), name="demo-models")

    async def start_demo(self, task: str) -> str:
        """The boot demo run: the last demo run of ``task`` resumed when a restart
        interrupted it; else a new one, which publishes as model ``task`` only when
        the repository has none (it never replaces a better served model)."""
        try:
            page = await asyncio.to_thread(
                self.runs.query_runs, f'task = "{task}" AND tags:"demo"', "created_at desc", 1)
        except Exception as exc:
            log.warning("looking for the last demo run failed: %s", exc)
        else:
            if page.runs and page.runs[0].state == cpb.RUN_STATE_INTERRUPTED:
                try:
                    resumed = await self.runs.resume_run(page.runs[0].run_id)
                except TensorwireError as exc:
                    log.info("demo run %s not resumed: %s", page.runs[0].run_id, exc)
                else:
                    log.info("demo run %s resumed at step %d", resumed.run_id, resumed.step)
                    return resumed.run_id
        try:
            served = bool(modelrepo.list_versions(self.settings.model_repository, task))
        except TensorwireError:
            served = False
        run = self.runs.start_run(task, {"max_steps": 0}, publish_as=() if served else (task,),
                                  name=f"demo {task}", tags=("demo",))
        return run.run_id

    async def prime_repository(self) -> None:
        """Train each missing demo model briefly, one after the other, in the background."""
        repo = self.settings.model_repository
        for name, steps in DEMO_MODELS.items():
            if name == self.settings.demo_task:
                continue
            try:
                if modelrepo.list_versions(repo, name):
                    continue
            except Exception:
                pass  # no such model yet
            run = self.runs.start_run(name, {"max_steps": steps}, publish_as=(name,), seed=1,
                                      name=f"demo model {name}", tags=("demo-model",))
            await asyncio.to_thread(run.loop.join)
            await asyncio.to_thread(self.runs.flush_checkpoints, 30.0)
            log.info("demo model %s trained (%d steps) and written", name, steps)

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self.runs), server)

    async def drain(self) -> None:
        return None

    async def aclose(self) -> None:
        if self._bootstrap is not None:
            self._bootstrap.cancel()
            await asyncio.gather(self._bootstrap, return_exceptions=True)
        await self.publisher.aclose()
        await self.runs.aclose()
        await self.announcer.aclose()


async def create_app(settings: TrainerSettings) -> TrainerApp:
    app = TrainerApp(settings)
    await app.start()
    return app
