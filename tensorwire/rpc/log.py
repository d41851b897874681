"""Logging set-up shared by every service: one line per record, service-named."""

from __future__ import annotations

import logging
import sys


def configure(service: str, level: str = "INFO") -> logging.Logger:
    """Configure the root logger once and return the service's logger."""
    root = logging.getLogger()
    if not getattr(root, "_tensorwire_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.handlers[:] = [handler]
        root._tensorwire_configured = True  # type: ignore[attr-defined]
    root.setLevel(level.upper())
    return logging.getLogger(f"tensorwire.{service}")
