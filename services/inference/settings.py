"""Inference settings: the only place its flags and environment are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tensorwire.rpc.config import setting
from tensorwire.serving.cache import CacheConfig, parse_cache_config
from tensorwire.serving.devices import TorchServiceSettings


@dataclass(frozen=True)
class InferenceSettings(TorchServiceSettings):
    env_prefix: ClassVar[str] = "TENSORWIRE_INFERENCE_"
    service: ClassVar[str] = "inference"

    port: int = setting(8001, env="PORT", help="gRPC port (Triton's default)", min=0, max=65535)
    http_port: int = setting(
        8000, env="HTTP_PORT", help="HTTP/REST Open Inference Protocol port, Triton's (-1 disables)",
        min=-1, max=65535,
    )
    metrics_port: int = setting(
        8002, env="METRICS_PORT", help="Prometheus /metrics port (-1 disables)", min=-1, max=65535
    )
    open_inference: bool = setting(
        False, env="OPEN_INFERENCE",
        help="with --auth-token-file: let callers without a token infer and read model "
             "metadata, config, readiness and statistics (loads, unloads and uploads keep "
             "needing the admin role)",
    )
    model_repository: Path = setting(
        Path("var/models"), env="MODEL_REPOSITORY", help="model repository directory"
    )
    create_model_repository: bool = setting(
        False, env="CREATE_MODEL_REPOSITORY",
        help="create --model-repository if it does not exist (tensorwire up does); without it a "
             "missing directory stops the service, as Triton does",
    )
    model_repository_url: str = setting(
        "", env="MODEL_REPOSITORY_URL",
        help="http(s):// model repository (same layout, any static file server) whose models "
             "RepositoryModelLoad mirrors into --model-repository first ('' = none)",
    )
    poll_interval_s: float = setting(
        1.0, env="POLL_INTERVAL_S", help="seconds between scans of the repository for new versions (0 = never)",
        min=0,
    )
    lazy_models: str = setting(
        "run-*", env="LAZY_MODELS",
        help="comma-separated name patterns (fnmatch) of models loaded on their first request "
             "(ModelInfer, ModelMetadata, ModelReady, ...) or RepositoryModelLoad instead of at boot, "
             "and not polled until then: the trainer's per-run checkpoints ('' = every model at boot)",
    )
    max_concurrent_loads: int = setting(
        3, env="MAX_CONCURRENT_LOADS", help="model versions loading at the same time", min=1, max=64
    )
    load_timeout_s: float = setting(
        30.0, env="LOAD_TIMEOUT_S", help="a model load taking longer fails", min=0.001
    )
    max_queue_size: int = setting(
        4096, env="MAX_QUEUE_SIZE",
        help="queued requests per model version beyond which requests get RESOURCE_EXHAUSTED", min=1,
    )
    max_model_mb: int = setting(
        1024, env="MAX_MODEL_MB",
        help="largest model (parameters and buffers, counted before anything is built) that a "
             "config override or an upload's model_args may ask for; more is RESOURCE_EXHAUSTED", min=1,
    )
    keep_uploaded_versions: int = setting(
        10, env="KEEP_UPLOADED_VERSIONS",
        help="after a checkpoint upload (UploadModel), versions of that model kept in the "
             "repository; older ones not served by its policy or traffic split are deleted (0 = all)",
        min=0,
    )
    infer_threads: int = setting(
        2, env="INFER_THREADS", help="threads running batched forwards (all models)", min=1, max=256
    )
    torch_threads: int = setting(
        1, env="TORCH_THREADS", help="torch intra-op threads per forward (0 = torch's default)", min=0
    )
    workers: int = setting(
        1, env="WORKERS",
        help="server processes sharing the port with SO_REUSEPORT (multi-core hosts)", min=1, max=256,
    )
    frontend: str = setting(
        "auto", env="FRONTEND", choices=("auto", "native", "python"),
        help="who serves gRPC on --port: native (the grpc++ frontend; ModelInfer batched with no "
             "Python per request, the other RPCs forwarded to the Python server on a loopback port), "
             "python (grpc.aio only), auto (native when built and TLS is off, else python; the default)",
    )
    native_streams: bool = setting(
        True, env="NATIVE_STREAMS",
        help="with the native frontend: serve ModelStreamInfer natively too (its messages batched "
             "with ModelInfer); off: streams are forwarded to the Python server",
    )
    cache_config: CacheConfig | None = setting(
        None, env="CACHE_CONFIG", repeatable=True, parse=parse_cache_config,
        help="response cache, Triton's form <cache>,<key>=<value>: local,size=<bytes> "
             "[local,max_entry_size=<bytes>] or redis,host=<h> redis,port=<p> [redis,user|password|db|"
             "ttl(s)|max_entry_size|tls_enabled|cert|key|cacert|connect_timeout(ms)|socket_timeout(ms)=...]; "
             "models opt in with \"response_cache\": {\"enable\": true} (none = no cache)",
    )

    def authorizer(self) -> Any:
        authorizer = super().authorizer()
        if authorizer is not None and self.open_inference:
            from tensorwire.rpc.auth import Authorizer

            authorizer = Authorizer(authorizer.tokens, open_inference=True)
        return authorizer
