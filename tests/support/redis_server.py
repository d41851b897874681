"""A real ``redis-server`` (Debian's package) on a free port, for the response-cache tests.

``RedisServer(port)`` starts it with no persistence, waits (poll with a deadline)
until it answers PING, and can be killed (SIGKILL: an outage, not a shutdown) and
started again on the same port. ``needs_redis`` skips a test when the binary is
missing (``scripts/install-system-deps.sh`` installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server not installed (scripts/install-system-deps.sh)"
)


class RedisServer:
    def __init__(self, port: int, log_dir: Path, *extra_args: str) -> None:
        self.port = port
        self.extra_args = extra_args
        self.log_path = log_dir / f"redis-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        assert REDIS_SERVER is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.log_path.parent),
                 *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not answering PING: {self.log_tail()}")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up, password or not
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: connections break mid-command, nothing is flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
