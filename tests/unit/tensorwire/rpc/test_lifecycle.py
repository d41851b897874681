"""stop_signal: the first signal asks for a shutdown, a second changes nothing (it is
the rule under a terminal and ``tensorwire up``), a third ends the process at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
HUNG_SHUTDOWN = """
import asyncio, sys
from tensorwire.rpc.lifecycle import stop_signal

async def main() -> None:
    async with stop_signal() as stop:
        print("ready", flush=True)
        await stop.wait()
        print("stopping", flush=True)
        await asyncio.sleep(3600)  # a shutdown that hangs

asyncio.run(main())
"""


def start() -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HUNG_SHUTDOWN], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_a_second_signal_changes_nothing_and_a_third_exits_at_once() -> None:
    proc = start()
    try:
        assert proc.stdout is not None
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline() == "stopping\n"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None  # still shutting down
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert time.monotonic() - started < 10
        assert proc.stderr is not None
        assert "3 stop signals: exiting now" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
