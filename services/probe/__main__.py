"""``python -m services.probe``: the lag probe, with its /metrics endpoint."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tensorwire.rpc.lifecycle import stop_signal
from tensorwire.rpc.metrics import MetricsEndpoint
from tensorwire.rpc.server import run_program

from .lag import LagProbe
from .settings import ProbeSettings


async def serve(settings: ProbeSettings) -> None:
    endpoint = MetricsEndpoint(settings.host, settings.port)
    probe = LagProbe(settings.trainer_target, settings.streamer_target, interval_s=settings.interval_s,
                     security=settings.client_security())
    async with stop_signal() as stop:
        endpoint.start()
        probe.start()
        try:
            await stop.wait()
        finally:
            await probe.aclose()
            endpoint.stop()


def main(argv: Sequence[str] | None = None) -> int:
    return run_program(ProbeSettings, serve, argv, prog="python -m services.probe", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
