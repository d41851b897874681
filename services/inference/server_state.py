"""Server-level state of the inference service (liveness, readiness, metadata)."""

from __future__ import annotations

from dataclasses import dataclass

from tensorwire import __version__


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


class ServerState:
    def __init__(self) -> None:
        self.live = True
        self.ready = True

    def model_ready(self, name: str, version: str) -> bool:
        return False

    def metadata(self) -> ServerMetadata:
        return ServerMetadata(name="tensorwire", version=__version__, extensions=())
