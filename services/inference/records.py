"""The inference core's plain records: what a model looks like from the outside, and
a request and its answer (protobuf-free: the servicer and the HTTP endpoint translate)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tensorwire.data.tensors import Tensor
from tensorwire.serving import modelrepo

PLATFORM = "pytorch_libtorch"
"""What ModelMetadata/ModelConfig report as the platform of the tensorwire kinds
(Triton's name for torch); Triton models report their own."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    dims: tuple[int, ...]
    """Without the batch dimension."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model looks like from the outside (metadata and config RPCs)."""

    name: str
    versions: tuple[int, ...]
    platform: str
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    max_queue_delay_us: int
    preferred_batch_size: tuple[int, ...]
    version_policy: modelrepo.VersionPolicy
    response_cache_enabled: bool = False
    """``response_cache { enable: true }`` in config.pbtxt (or the config.json key)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The whole config (what the ModelConfig RPC returns)."""


@dataclass(frozen=True, slots=True)
class InferRequest:
    model: str
    version: str
    """Empty: picked by the traffic split."""
    id: str
    inputs: Sequence[Tensor]
    outputs: Sequence[str] = ()
    """Requested outputs; empty = all."""


@dataclass(frozen=True, slots=True)
class InferResult:
    model: str
    version: str
    id: str
    outputs: list[Tensor]


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str = ""


def tensor_infos(specs: list[dict[str, Any]]) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(t["name"], t["datatype"], tuple(int(d) for d in t["dims"])) for t in specs)
