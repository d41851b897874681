"""tensorwire's shared library: server wiring, settings, errors, channels, batching,
chunked streaming, and the in-process SDK (``tensorwire.init``, see
:mod:`tensorwire.track`). It imports no service code. Generated protobuf stubs live
in its subpackages (``tensorwire.trainer.v1``, ``tensorwire.inference``, ...).

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
