"""Tell the inference service about new checkpoints (best effort, never blocking).

``announce(name, version)`` may be called from any thread. One task sends
``inference.GRPCInferenceService/RepositoryModelLoad`` for each announced model
(latest wins per model), retrying with exponential backoff while inference is
down, and gives up on a model after ``max_attempts`` (the next checkpoint
announces it again). Training never waits for any of it.

With ``push`` (inference has its own model repository: pods without a shared
volume), the checkpoint file is first streamed to inference with
``tensorwire.transfer.v1.ModelTransferService/UploadModel`` (chunked, checked,
installed there atomically under the same version number). Calls go through
``tensorwire.client.InferenceClient``, i.e. a channel pool.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from tensorwire.calls.backoff import Backoff
from tensorwire.calls.channels import ChannelPool
from tensorwire.client import InferenceClient, RetryPolicy
from tensorwire.errors import AlreadyExistsError, FailedPreconditionError, TensorwireError
from tensorwire.rpc.auth import ClientSecurity
from tensorwire.serving import modelrepo

log = logging.getLogger(__name__)

_GIVE_UP = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)


class ModelAnnouncer:
    """Asks inference to (re)load models whose new versions were written."""

    def __init__(self, target: str, *, repository: Path | None = None, push: bool = False,
                 max_attempts: int = 8, timeout_s: float = 10.0, backoff_max_s: float = 10.0,
                 upload_timeout_s: float = 600.0, security: ClientSecurity | None = None) -> None:
        self.target = target
        self.security = security
        self.repository = repository
        self.push = push and repository is not None
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.upload_timeout_s = upload_timeout_s
        self.backoff_max_s = backoff_max_s
        self._backoff = Backoff(initial_s=min(0.25, backoff_max_s), max_s=backoff_max_s)
        self.loaded: dict[str, int] = {}
        """Model name -> how many loads inference acknowledged."""
        self.pushed: dict[str, int] = {}
        """Model name -> newest version inference holds from this trainer (push mode)."""
        self.client: InferenceClient | None = None
        self._versions: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def pool(self) -> ChannelPool | None:
        """The channel pool to inference (None until started with a target)."""
        return self.client.pool if self.client is not None else None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.target:
            # One try per call: retries are this announcer's own, spaced by its backoff.
            self.client = InferenceClient(self.target, timeout_s=self.timeout_s,
                                          retry=RetryPolicy(attempts=1), max_size=2,
                                          security=self.security)
            self._task = asyncio.create_task(self._run(), name="announce")

    def announce(self, name: str, version: int = 0) -> None:
        """Thread-safe: schedule a RepositoryModelLoad of ``name`` (after pushing
        ``version`` in push mode)."""
        if self._loop is None or not self.target:
            return
        self._loop.call_soon_threadsafe(self._add, name, version)

    def _add(self, name: str, version: int) -> None:
        self._pending[name] = 0
        if version:
            self._versions[name] = max(version, self._versions.get(name, 0))
        self._wake.set()

    async def _deliver(self, name: str) -> None:
        assert self.client is not None
        version = self._versions.get(name, 0)
        if self.push and version > self.pushed.get(name, 0):
            assert self.repository is not None
            config = modelrepo.read_config(self.repository, name)
            path = modelrepo.weights_path(self.repository, name, version)
            upload = dict(model=name, kind=config["kind"], model_args=config.get("model_args"),
                          timeout_s=self.upload_timeout_s)
            try:
                result = await self.client.upload_checkpoint(path, version=version, **upload)
            except AlreadyExistsError:
                result = None  # inference has it already (e.g. a shared volume after all)
            except FailedPreconditionError as exc:
                # Inference holds newer versions than ours (this trainer restarted on an
                # empty repository): install ours as its next version, or it is never served.
                log.warning("%s; pushing version %d as inference's next version", exc, version)
                result = await self.client.upload_checkpoint(path, **upload)
            if result is not None:
                log.info("pushed %s version %d to inference as version %d (%d bytes, %d on the wire)",
                         name, version, result.version, result.bytes, result.wire_bytes)
            self.pushed[name] = version
        await self.client.load_model(name)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                name, attempt = next(iter(self._pending.items()))
                del self._pending[name]
                try:
                    await self._deliver(name)
                    self.loaded[name] = self.loaded.get(name, 0) + 1
                    log.info("inference loaded %s", name)
                except asyncio.CancelledError as exc:
                    if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                        raise  # this announcer is being stopped
                    # gRPC cancels a call whose request stream failed (e.g. its file went)
                    self._failed(name, attempt, exc)
                except (TensorwireError, OSError) as exc:
                    self._failed(name, attempt, exc)

    def _failed(self, name: str, attempt: int, exc: BaseException) -> None:
        """Retry ``name`` later with backoff, or give up on it (its next checkpoint
        announces it again)."""
        code = getattr(exc, "code", None)
        if attempt + 1 >= self.max_attempts or code in _GIVE_UP:
            log.warning("inference did not load %s: %s", name, exc or type(exc).__name__)
            return
        delay = self._backoff.delay_s(attempt + 1)
        asyncio.get_running_loop().call_later(delay, self._retry, name, attempt + 1)

    def _retry(self, name: str, attempt: int) -> None:
        self._pending.setdefault(name, attempt)
        self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
