"""Wiring of the inference service: core + servicer + server."""

from __future__ import annotations

import dataclasses
import logging

import grpc

from services.inference.transfer import SERVICE_NAME as TRANSFER_SERVICE_NAME
from services.inference.transfer import ModelTransferServicer
from tensorwire.calls.httppool import HttpModelRepository, HttpPool
from tensorwire.checkpoints.receiver import CheckpointReceiver
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc
from tensorwire.rpc.config import SettingsError
from tensorwire.rpc.rpcnames import service_name
from tensorwire.serving.cache import describe_cache, open_cache
from tensorwire.serving.devices import resolve_device
from tensorwire.serving.loader import LoaderConfig

from .http import HttpEndpoint, InferenceHttp
from .metrics import COLLECTOR
from .native import NativeFrontend, choose
from .repository import ModelRepository, RepositoryOptions
from .server_state import ServerState
from .servicer import InferenceServicer
from .settings import InferenceSettings

log = logging.getLogger(__name__)

SERVICE_NAME = service_name(pb, "GRPCInferenceService")


def repository_options(settings: InferenceSettings) -> RepositoryOptions:
    return RepositoryOptions(
        poll_interval_s=settings.poll_interval_s,
        loader=LoaderConfig(
            max_concurrent_loads=settings.max_concurrent_loads, load_timeout_s=settings.load_timeout_s
        ),
        batch_overrides=(("max_queue_size", settings.max_queue_size),),
        max_model_bytes=settings.max_model_mb << 20,
        infer_threads=settings.infer_threads,
        torch_threads=settings.torch_threads,
        device=str(resolve_device(settings.device, settings.env_prefix)),
        lazy_models=tuple(p.strip() for p in settings.lazy_models.split(",") if p.strip()),
    )


class InferenceApp:
    service_names = (SERVICE_NAME, TRANSFER_SERVICE_NAME)

    def __init__(self, settings: InferenceSettings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.state = ServerState()
        options = repository_options(settings)
        # Models from an HTTP(S) repository: one pooled HTTP client, mirrored on load.
        self.http_pool: HttpPool | None = None
        if settings.model_repository_url:
            self.http_pool = HttpPool()
            mirror = HttpModelRepository(settings.model_repository_url, settings.model_repository,
                                         self.http_pool)
            options = dataclasses.replace(options, fetch=mirror.sync)
        # The response cache: this app owns it (closed after the repository).
        self.cache = open_cache(settings.cache_config)
        log.info("%s", describe_cache(settings.cache_config))
        options = dataclasses.replace(options, cache=self.cache)
        self.repository = ModelRepository(settings.model_repository, options)
        # Checkpoints pushed by trainers that share no volume with this service.
        self.transfer = ModelTransferServicer(
            CheckpointReceiver(settings.model_repository, keep_versions=settings.keep_uploaded_versions,
                               max_model_bytes=settings.max_model_mb << 20)
        )
        COLLECTOR.add(self.repository)
        # Who serves gRPC on the port: the native frontend (tensorwire.rpc.server.GrpcServer
        # then binds the Python server to a loopback port behind it) or Python alone.
        self.frontend: NativeFrontend | None
        self.frontend, line = choose(settings.frontend, self.repository, settings.infer_threads,
                                     tls=settings.server_tls() is not None, streams=settings.native_streams)
        log.info("%s", line)
        # HTTP/REST v2 beside gRPC: the same repository, batchers and errors.
        self.http: HttpEndpoint | None = None
        if settings.http_port >= 0:
            self.http = HttpEndpoint(
                InferenceHttp(self.state, self.repository, settings.max_message_mb * 1024 * 1024,
                              settings.authorizer()),
                settings.host, settings.http_port, reuse_port=reuse_port, tls=settings.server_tls(),
            )

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (None: HTTP is off)."""
        return self.http.port if self.http is not None else None

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.state, self.repository), server
        )
        self.transfer.register(server)

    async def until_ready(self) -> None:
        """Health turns SERVING once the boot scan of the repository is done."""
        await self.repository.until_ready()

    async def drain(self) -> None:
        self.state.ready = False

    async def aclose(self) -> None:
        self.state.ready = False
        if self.http is not None:  # in-flight HTTP requests finish on the open repository
            await self.http.aclose()
        await self.repository.aclose()
        COLLECTOR.discard(self.repository)
        if self.cache is not None:
            await self.cache.aclose()
        if self.http_pool is not None:
            await self.http_pool.aclose()


async def create_app(
    settings: InferenceSettings, *, reuse_port: bool = False, wait_for_models: bool = True
) -> InferenceApp:
    """The started app: repository loaded, HTTP listening (``reuse_port``: worker processes).

    ``wait_for_models=False`` (the service's entry points) returns with the boot scan
    still running: the servers listen at once and report NOT_SERVING until it is done."""
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    repo = settings.model_repository
    if not repo.is_dir():
        if repo.exists() or not settings.create_model_repository:
            what = "is not a directory" if repo.exists() else "does not exist"
            raise SettingsError(
                f"model repository {repo} (--model-repository) {what}; create it, or pass "
                "--create-model-repository"
            )
        repo.mkdir(parents=True, exist_ok=True)
    app = InferenceApp(settings, reuse_port=reuse_port)
    await app.repository.start(wait=wait_for_models)
    if app.http is not None:
        try:
            await app.http.start()
        except BaseException:
            await app.aclose()
            raise
    return app
