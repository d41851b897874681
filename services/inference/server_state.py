"""Server-level state of the inference service (liveness, readiness, metadata)."""

from __future__ import annotations

from dataclasses import dataclass

from tensorwire import __version__

EXTENSIONS = ("model_repository", "statistics", "model_configuration", "binary_tensor_data")


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


class ServerState:
    def __init__(self) -> None:
        self.live = True
        self.ready = True

    def metadata(self) -> ServerMetadata:
        return ServerMetadata(name="tensorwire", version=__version__, extensions=EXTENSIONS)
