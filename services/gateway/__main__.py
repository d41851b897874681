"""``tensorwire-gateway``: serve the web app and translate gRPC-Web to gRPC."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from tensorwire import config
from tensorwire import log as twlog

from .app import serve
from .settings import GatewaySettings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = config.load(GatewaySettings, argv, prog="tensorwire-gateway", description=__doc__)
    except config.SettingsError as exc:
        print(f"tensorwire-gateway: {exc}", flush=True)
        return 2
    logger = twlog.configure(settings.service, settings.log_level)
    logger.info("settings: %s", config.describe(settings))
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
