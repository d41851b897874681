"""Multi-process mode: N inference processes sharing one port with SO_REUSEPORT.

One Python process serves at most one core's worth of protobuf and gRPC work;
on a multi-core host the kernel spreads new connections over ``workers``
processes that each bind the same port with SO_REUSEPORT and each load the
whole repository. The parent only starts the workers, forwards SIGTERM/SIGINT
to them (each drains gracefully), and exits with the first non-zero status.
Worker 0 keeps the metrics port; the others do not expose one (a scrape of
port 8002 therefore sees worker 0 only; per-worker metrics need a port each).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
from types import FrameType

from tensorwire.rpc import log as twlog
from tensorwire.rpc.config import describe
from tensorwire.rpc.server import options_for, serve

from .settings import InferenceSettings

log = logging.getLogger(__name__)


def _worker(settings: InferenceSettings, index: int) -> None:
    from .app import create_app

    logger = twlog.configure(f"{settings.service}-{index}", settings.log_level)
    logger.info("worker %d serving on port %d", index, settings.port)
    options = options_for(settings, reuse_port=True)
    asyncio.run(serve(options, lambda: create_app(settings, reuse_port=True, wait_for_models=False)))


def _pick_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host != "0.0.0.0" else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_workers(settings: InferenceSettings) -> int:
    """Start ``settings.workers`` processes on one port; return the exit status."""
    logger = twlog.configure(settings.service, settings.log_level)
    port = settings.port or _pick_port(settings.host)
    http_port = settings.http_port or _pick_port(settings.host)  # -1 (off) stays -1
    logger.info("settings: %s", describe(settings))
    context = multiprocessing.get_context("spawn")
    processes = []
    for index in range(settings.workers):
        worker_settings = dataclasses.replace(
            settings,
            port=port,
            http_port=http_port,
            metrics_port=settings.metrics_port if index == 0 else -1,
            workers=1,
        )
        process = context.Process(target=_worker, args=(worker_settings, index), name=f"inference-{index}")
        process.start()
        processes.append(process)
    logger.info("%d inference workers on port %d (SO_REUSEPORT)", len(processes), port)

    def forward(signum: int, frame: FrameType | None) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for process in processes:
        process.join()
        if process.exitcode:
            status = status or (process.exitcode if process.exitcode > 0 else 1)
    return status
