"""Receiving checkpoints from services that share no filesystem (protobuf-free).

An upload is a header (model, kind, size), the file as ``tensorwire.checkpoints.chunking``
chunks, and a trailer (whole-file CRC32). ``CheckpointReceiver`` writes the chunks
into a staging folder inside the model's folder of its repository, verifies every
chunk and the whole, checks the file is a loadable state_dict (memory-mapped,
tensors not read) or model file of its platform, and installs it atomically as a
new version with ``modelrepo.install_weights_file``.

Nothing is ever installed from a bad stream: a checksum, order or size mismatch is
``DataLossError`` (DATA_LOSS); a stream that ends without its trailer, or is
cancelled, is ``AbortedError`` (ABORTED) or a cancellation; in every case the
staging folder is removed. The gRPC adapter is the inference service's
(``services/inference/transfer.py``); the sender is :mod:`tensorwire.checkpoints.upload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorwire.checkpoints.chunking import Chunk, ChunkReceiver, MiB
from tensorwire.errors import (
    AbortedError,
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TensorwireError,
)
from tensorwire.serving import admission, modelrepo, tritonconfig
from tensorwire.serving.tritonconfig import PLATFORMS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadHeader:
    model: str
    kind: str
    total_bytes: int
    model_args: dict[str, Any] | None = None
    version: int | None = None
    """None = the next free version number."""
    triton_config: str = ""
    """For a Triton model file: its config.pbtxt, installed with the version ("" = keep
    the folder's, or auto-complete)."""


@dataclass(frozen=True)
class UploadTrailer:
    crc32: int
    total_bytes: int
    chunks: int


@dataclass(frozen=True)
class UploadResult:
    model: str
    version: int
    bytes: int
    crc32: int
    chunks: int
    wire_bytes: int


UploadPart = UploadHeader | Chunk | UploadTrailer


class CheckpointReceiver:
    """Receives uploads into a model repository; installs only verified files."""

    def __init__(
        self,
        repository: Path,
        *,
        max_bytes: int = 8 * 1024 * MiB,
        max_chunk_bytes: int = 16 * MiB,
        on_installed: Callable[[str, int], Awaitable[None]] | None = None,
        keep_versions: int = 0,
        max_model_bytes: int = admission.DEFAULT_MAX_MODEL_BYTES,
    ) -> None:
        """
        :param repository: the model repository folder.
        :param max_bytes: largest checkpoint accepted.
        :param max_chunk_bytes: largest chunk (uncompressed) accepted.
        :param on_installed: awaited with (model, version) after each install, e.g.
            to have the loader pick the new version up at once.
        :param keep_versions: after an install, delete all but the newest N versions of
            that model (``modelrepo.prune_versions``; 0 = keep all).
        :param max_model_bytes: largest model a new model's ``model_args`` may describe
            (``tensorwire.serving.admission.check_model_size``, counted before anything is built).
        """
        self.max_model_bytes = max_model_bytes
        self.repository = Path(repository)
        self.keep_versions = keep_versions
        self.max_bytes = max_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.on_installed = on_installed
        self.installed = 0
        self.refused = 0
        self._install_lock = asyncio.Lock()  # one version number at a time

    async def receive(self, parts: AsyncIterator[UploadPart]) -> UploadResult:
        """Consume one upload; returns what was installed. A full disk is
        RESOURCE_EXHAUSTED (nothing installed), not INTERNAL."""
        try:
            return await self._receive(parts)
        except OSError as exc:
            self.refused += 1
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhaustedError(
                    f"the model repository is out of space ({exc.strerror}); nothing was installed"
                ) from exc
            raise
        except BaseException:
            self.refused += 1
            raise

    async def _receive(self, parts: AsyncIterator[UploadPart]) -> UploadResult:
        header = await anext(parts, None)
        if not isinstance(header, UploadHeader):
            raise InvalidArgumentError("an upload must start with its header (model, kind, size)")
        self._check_header(header)
        folder = self.repository / header.model
        made_folder = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".upload-", suffix=".tmp", dir=folder))
        weights = staging / modelrepo.WEIGHTS_FILE
        try:
            with open(weights, "wb") as sink:
                receiver = ChunkReceiver(
                    sink, max_chunk_bytes=self.max_chunk_bytes, max_total_bytes=header.total_bytes
                )
                trailer = None
                async for part in parts:
                    if isinstance(part, Chunk):
                        if trailer is not None:
                            raise DataLossError("chunk after the trailer")
                        await receiver.feed(part)
                    elif isinstance(part, UploadTrailer):
                        trailer = part
                    else:
                        raise InvalidArgumentError("a second header in one upload")
                if trailer is None:
                    raise AbortedError(
                        f"upload of model {header.model!r} ended after {receiver.chunk_count} chunks "
                        f"({receiver.total_bytes} of {header.total_bytes} bytes) without its "
                        "trailer; nothing installed"
                    )
                if trailer.total_bytes != header.total_bytes:
                    raise DataLossError(
                        f"trailer says {trailer.total_bytes} bytes, header said {header.total_bytes}"
                    )
                await receiver.finish(
                    total_bytes=trailer.total_bytes, crc32=trailer.crc32, chunks=trailer.chunks
                )
            if header.kind in PLATFORMS:
                # A Triton model file (TorchScript, ExportedProgram, ONNX): a graph and
                # weights, no Python; the inference loader checks it before it serves.
                await asyncio.to_thread(_check_model_file, weights, header.kind)
            else:
                await asyncio.to_thread(_check_state_dict, weights)
            async with self._install_lock:
                version = await asyncio.to_thread(
                    modelrepo.install_weights_file,
                    self.repository,
                    header.model,
                    header.kind,
                    weights,
                    model_args=header.model_args,
                    version=header.version,
                    triton_config=header.triton_config,
                )
                try:
                    pruned = await asyncio.to_thread(
                        modelrepo.prune_versions, self.repository, header.model, self.keep_versions,
                        (version,),
                    )
                except (OSError, TensorwireError) as exc:  # the upload itself succeeded
                    log.warning("model %s: pruning old versions failed: %s", header.model, exc)
                else:
                    if pruned:
                        log.info("model %s: pruned versions %s", header.model, pruned)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if made_folder:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds when nothing was installed
        self.installed += 1
        log.info(
            "installed %s version %d (%d bytes in %d chunks, %.2fx compression)",
            header.model, version, receiver.total_bytes, receiver.chunk_count,
            receiver.metrics.compression_ratio,
        )
        if self.on_installed is not None:
            await self.on_installed(header.model, version)
        return UploadResult(
            model=header.model,
            version=version,
            bytes=receiver.total_bytes,
            crc32=receiver.crc32,
            chunks=receiver.chunk_count,
            wire_bytes=receiver.metrics.wire_bytes,
        )

    def _check_header(self, header: UploadHeader) -> None:
        modelrepo.check_name(header.model)
        if not header.kind:
            raise InvalidArgumentError(f"upload of model {header.model!r} names no kind")
        if not 0 < header.total_bytes <= self.max_bytes:
            raise InvalidArgumentError(
                f"upload of model {header.model!r}: size {header.total_bytes} bytes is not in "
                f"1..{self.max_bytes}"
            )
        if header.model_args is not None and not isinstance(header.model_args, dict):
            raise InvalidArgumentError(
                f"header.model_args must be a JSON object, got {admission.echo(header.model_args)}"
            )
        if header.triton_config:
            if header.kind not in PLATFORMS:
                raise InvalidArgumentError(
                    f"upload of model {header.model!r}: a config.pbtxt comes only with a Triton model "
                    f"file ({', '.join(PLATFORMS)}), not kind {admission.echo(header.kind)}"
                )
            tritonconfig.check_sent_config(header.triton_config, header.model, header.kind)  # before any chunk
        if header.kind not in PLATFORMS and not modelrepo.config_path(self.repository, header.model).is_file():
            # A new model: its config will say what to build; refuse an absurd one now.
            admission.check_model_size(header.kind, header.model_args or {}, self.max_model_bytes)
        if header.version is None:
            return
        present = modelrepo.list_versions(self.repository, header.model)
        admission.check_new_version(header.version, present[-1] if present else 0, header.model)
        if present and header.version < present[-1]:
            raise FailedPreconditionError(
                f"model {header.model!r} already has version {present[-1]}, newer than {header.version}: "
                "a latest-version policy would never serve it (did the sender restart with an empty "
                "repository?); upload without a version to install it as the next one"
            )
        if header.version in present:
            raise AlreadyExistsError(f"model {header.model!r} already has version {header.version}")


def _check_state_dict(path: Path) -> None:
    """The file is a torch state_dict (weights_only, memory-mapped: tensors stay on disk)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise InvalidArgumentError(f"the uploaded file is not a loadable checkpoint: {exc}") from None
    if not isinstance(state, dict):
        raise InvalidArgumentError(f"the uploaded file holds a {type(state).__name__}, not a state_dict")


def _check_model_file(path: Path, platform: str) -> None:
    """The file looks like a ``platform`` model: a zip archive (TorchScript, .pt2) or an
    ONNX protobuf whose graph onnxruntime can read; never unpickled here."""
    import zipfile

    if platform == "onnxruntime_onnx":
        tritonconfig.signature(platform, path)  # InvalidArgumentError when unreadable
        return
    if not zipfile.is_zipfile(path):
        raise InvalidArgumentError(f"the uploaded file is not a {platform} model (not a zip archive)")

