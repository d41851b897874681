"""``tensorwire-streamer``: run the streamer service."""

from __future__ import annotations

import sys

from tensorwire.rpc.server import run_main

from .app import create_app
from .settings import StreamerSettings


def main(argv: list[str] | None = None) -> int:
    return run_main(StreamerSettings, create_app, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
