"""Trainer settings: the only place its flags and environment are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tensorwire.rpc.config import setting
from tensorwire.serving.devices import TorchServiceSettings


@dataclass(frozen=True)
class TrainerSettings(TorchServiceSettings):
    env_prefix: ClassVar[str] = "TENSORWIRE_TRAINER_"
    service: ClassVar[str] = "trainer"

    port: int = setting(50051, env="PORT", help="gRPC port", min=0, max=65535)
    metrics_port: int = setting(
        9101, env="METRICS_PORT", help="Prometheus /metrics port (-1 disables)", min=-1, max=65535
    )
    streamer_target: str = setting(
        "127.0.0.1:50052", env="STREAMER_TARGET",
        help="streamer address(es) to publish to: host:port, a comma list, or dns:///name:port",
    )
    inference_target: str = setting(
        "127.0.0.1:8001", env="INFERENCE_TARGET",
        help="inference service to announce checkpoints to ('' = none)",
    )
    model_repository: Path = setting(
        Path("var/models"), env="MODEL_REPOSITORY", help="where checkpoints are written"
    )
    push_checkpoints: bool = setting(
        False, env="PUSH_CHECKPOINTS",
        help="stream each checkpoint to inference (ModelTransferService/UploadModel) before "
             "asking it to load: for pods that share no volume with inference",
    )
    data_dir: str = setting(
        "", env="DATA_DIR",
        help="the run store's SQLite file (runs.sqlite3, unless --run-store says otherwise) and "
             "each run's resumable training state (state/<run_id>.pt); '' = 'trainer' beside "
             "--model-repository (var/trainer)",
    )
    run_store: str = setting(
        "", env="RUN_STORE",
        help="where runs, events and scalar history are kept: '' = SQLite in --data-dir, a file "
             "path = SQLite there, postgresql://user:password@host/db = PostgreSQL (trainer replicas "
             "share one run list), none = memory only",
    )
    keep_runs: int = setting(
        200, env="KEEP_RUNS",
        help="ended runs kept in the run store; older ones are deleted with their history, "
             "run-<id> models and training state (0 = keep all)",
        min=0,
    )
    demo_task: str = setting(
        "", env="DEMO_TASK", help="task of a run started at boot ('' = none)"
    )
    demo_models: bool = setting(
        True, env="DEMO_MODELS",
        help="with --demo-task: also train the other tasks' demo models briefly at boot, "
             "in the background, when the repository lacks them",
    )
    checkpoint_every_steps: int = setting(
        0, env="CHECKPOINT_EVERY_STEPS", help="checkpoint every N steps (0 = by time only)", min=0
    )
    checkpoint_every_s: float = setting(
        30.0, env="CHECKPOINT_EVERY_S", help="checkpoint every N seconds (0 = by steps only)", min=0
    )
    keep_checkpoints: int = setting(
        10, env="KEEP_CHECKPOINTS",
        help="versions of each model kept in the repository; older ones are deleted after each "
             "checkpoint, except those the model's version policy or traffic split still serves "
             "(0 = keep all)",
        min=0,
    )
    max_fps: float = setting(
        20.0, env="MAX_FPS", help="most views built per second and run", min=0.1, max=60
    )
    view_cpu_budget: float = setting(
        0.02, env="VIEW_CPU_BUDGET",
        help="share of one CPU that building a run's views may take (caps views/s further)",
        min=0.001, max=1.0,
    )
    view_renderer: str = setting(
        "auto", env="VIEW_RENDERER", choices=("auto", "process", "thread"),
        help="where views are rendered: a worker process (shares no GIL with training, costs a "
             "CPU of its own), a thread of the trainer (shares the GIL, no CPU beyond its own "
             "work), or auto: the process when the trainer may use 2 CPUs or more (its affinity "
             "and cgroup quota), else the thread",
    )
    # Named for its flag, --task-module (repeatable): a tuple of every use.
    task_module: tuple[str, ...] = setting(
        (), env="TASK_MODULES",
        help="task plugins to load: a .py file or a module name (entry points of the group "
             "tensorwire.tasks load too); one that fails is reported and skipped",
    )
    max_active_runs: int = setting(
        8, env="MAX_ACTIVE_RUNS", help="runs training at once", min=1, max=256
    )
    @property
    def data_path(self) -> Path:
        """--data-dir, or 'trainer' beside the model repository."""
        return Path(self.data_dir) if self.data_dir else self.model_repository.parent / "trainer"

    torch_threads: int = setting(
        1, env="TORCH_THREADS", help="torch intra-op threads per process (small models: 1)",
        min=1, max=256,
    )
