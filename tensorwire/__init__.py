"""tensorwire's shared library; it imports no service code. At the top level, what
users import: the in-process SDK (``tensorwire.init``, see :mod:`tensorwire.track`),
the inference client, tasks, views, errors. Hand-written parts in ``rpc`` (server
wiring, settings, auth), ``calls`` (channels, backoff, periodic loops, publishing),
``checkpoints`` (chunked transfer), ``serving`` (batching, loader, repository) and
``data`` (tensors, arrays, scalars); generated protobuf stubs in ``common``,
``trainer``, ``streamer``, ``transfer`` (``.v1``) and ``inference``.

Nothing heavy is imported with the package: ``tensorwire.init`` and
``tensorwire.Run`` load :mod:`tensorwire.track` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tensorwire.track import Run, init

__all__ = ["Run", "init"]


def __getattr__(name: str) -> Any:
    if name in ("init", "Run"):
        from tensorwire import track

        return getattr(track, name)
    raise AttributeError(f"module 'tensorwire' has no attribute {name!r}")
