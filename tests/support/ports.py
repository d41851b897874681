"""Free TCP ports for servers a test starts in another process.

Binding port 0 and closing the socket (the usual recipe) loses races two ways: the
kernel may hand the same port to the next such call (two services of one suite on
one port: CI once saw the gateway take the trainer's port), and any client socket's
ephemeral source port may take it before the server binds. So ports come from below
the kernel's ephemeral range, which no connect() ever uses, each at most once per
process, walking on from a random start (drawn again in a forked child) so that two
test processes on one machine walk different stretches.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

_LOW = 10_000
_lock = threading.Lock()
_handed: set[int] = set()


def _ephemeral_start() -> int:
    """Where the kernel's ephemeral range starts (its default where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


_HIGH = max(_LOW + 1_000, _ephemeral_start())
_next = 0
_owner = 0
"""The process ``_next`` and ``_handed`` belong to (a forked child starts afresh)."""


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on, never returned before in this process."""
    global _next, _owner
    with _lock:
        if _owner != os.getpid():
            _owner, _next = os.getpid(), random.SystemRandom().randrange(_LOW, _HIGH)
            _handed.clear()
        for _ in range(_HIGH - _LOW):
            port, _next = _next, _LOW + (_next + 1 - _LOW) % (_HIGH - _LOW)
            if port not in _handed and _bindable(port):
                _handed.add(port)
                return port
    raise RuntimeError(f"no free port left in {_LOW}-{_HIGH - 1}")
