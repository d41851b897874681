"""``python -m services.probe``: the lag probe, with its /metrics endpoint."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from tensorwire import config
from tensorwire import log as twlog
from tensorwire.metrics import MetricsEndpoint

from .lag import LagProbe
from .settings import ProbeSettings


async def serve(settings: ProbeSettings) -> None:
    endpoint = MetricsEndpoint(settings.host, settings.port)
    probe = LagProbe(settings.trainer_target, settings.streamer_target, interval_s=settings.interval_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    endpoint.start()
    probe.start()
    try:
        await stop.wait()
    finally:
        await probe.aclose()
        endpoint.stop()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = config.load(ProbeSettings, argv, prog="python -m services.probe", description=__doc__)
    except config.SettingsError as exc:
        print(f"probe: {exc}", file=sys.stderr, flush=True)
        return 2
    logger = twlog.configure(settings.service, settings.log_level)
    logger.info("settings: %s", config.describe(settings))
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
