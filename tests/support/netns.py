"""Throttled network namespaces for the live-training test and benchmark (root only).

Inside a namespace, loopback gets an htb root qdisc whose default class is fast
(10 Gbit/s) and a slow class (1:20) that a u32 filter applies only to packets
leaving one source port, i.e. to what a server on that port sends. ``gso_max_segs
1`` stops the kernel from batching segments past the shaper, and
``tcp_notsent_lowat`` (per namespace) keeps the unsent part of each socket
buffer small, as the streamer's deployment notes ask.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Sequence


def is_root() -> bool:
    return os.geteuid() == 0


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class ThrottledNetns:
    """A network namespace whose loopback can throttle one server port."""

    def __init__(self, prefix: str = "twa", notsent_lowat: int = 16384) -> None:
        self.name = f"{prefix}{uuid.uuid4().hex[:8]}"
        self.notsent_lowat = notsent_lowat
        self._throttled: int | None = None

    def __enter__(self) -> ThrottledNetns:
        _run("ip", "netns", "add", self.name)
        try:
            self.exec_("ip", "link", "set", "dev", "lo", "up")
            self.exec_("ip", "link", "set", "dev", "lo", "gso_max_segs", "1")
            self.exec_("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10")
            self.exec_("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb",
                       "rate", "10gbit")
            self.exec_("tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb",
                       "rate", "1mbit", "ceil", "1mbit")
            if self.notsent_lowat:
                self.exec_("sysctl", "-q", "-w", f"net.ipv4.tcp_notsent_lowat={self.notsent_lowat}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)

    def exec_(self, *cmd: str) -> None:
        _run("ip", "netns", "exec", self.name, *cmd)

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def throttle(self, port: int, rate: str) -> None:
        """Limit what leaves ``port`` to ``rate`` (e.g. "1mbit", "500kbit")."""
        self.exec_("tc", "class", "change", "dev", "lo", "parent", "1:", "classid", "1:20", "htb",
                   "rate", rate, "ceil", rate)
        if self._throttled != port:
            self.unthrottle()
            self.exec_("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
                       "u32", "match", "ip", "sport", str(port), "0xffff", "flowid", "1:20")
            self._throttled = port

    def unthrottle(self) -> None:
        if self._throttled is not None:
            self.exec_("tc", "filter", "del", "dev", "lo", "parent", "1:", "prio", "1")
            self._throttled = None


def list_netns(prefix: str) -> Sequence[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def attach(name: str) -> ThrottledNetns:
    """A handle on an existing namespace made by :class:`ThrottledNetns` (no cleanup)."""
    ns = ThrottledNetns.__new__(ThrottledNetns)
    ns.name = name
    ns.notsent_lowat = 0
    ns._throttled = None
    return ns
