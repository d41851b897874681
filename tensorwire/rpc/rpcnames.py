"""RPC names from the generated descriptors, never typed by hand: a method renamed or
removed in a ``.proto`` fails at import (KeyError naming it), not at its first call.

``module`` is a generated ``*_pb2`` module (its ``DESCRIPTOR`` is the proto file).
"""

from __future__ import annotations

from types import ModuleType


def service_name(module: ModuleType, service: str) -> str:
    """``package.Service``, e.g. ``tensorwire.streamer.v1.StreamerService``."""
    return str(module.DESCRIPTOR.services_by_name[service].full_name)


def method_names(module: ModuleType, service: str) -> frozenset[str]:
    """The methods ``service`` declares (``{"Subscribe", "Publish", ...}``)."""
    return frozenset(module.DESCRIPTOR.services_by_name[service].methods_by_name)


def method_path(module: ModuleType, service: str, method: str) -> str:
    """The full method path gRPC calls and interceptors see: ``/package.Service/Method``."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    return f"/{descriptor.full_name}/{descriptor.methods_by_name[method].name}"
