"""``tensorwire-gateway``: serve the web app and translate gRPC-Web to gRPC."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tensorwire.rpc.server import run_program

from .app import serve
from .settings import GatewaySettings


def main(argv: Sequence[str] | None = None) -> int:
    return run_program(GatewaySettings, serve, argv, prog="tensorwire-gateway", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
