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
import re
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
        self._throttled: tuple[int, bool] | None = None

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

    def throttle(self, port: int, rate: str, *, ipv6_only: bool = False) -> None:
        """Limit what leaves ``port`` to ``rate`` (e.g. "1mbit", "500kbit").

        ``ipv6_only``: only what leaves it over IPv6. A server listening on
        ``localhost`` takes both; clients that dial ``[::1]`` (the viewers) then get
        the slow link, and clients that dial ``127.0.0.1`` (a trainer publishing to
        the streamer) do not: a viewer's link must not also carry the server's TCP
        ACKs and answers to another client (at 32 kbit/s the trainer's alone took
        ~1.5 KB/s of the 4 KB/s)."""
        self.exec_("tc", "class", "change", "dev", "lo", "parent", "1:", "classid", "1:20", "htb",
                   "rate", rate, "ceil", rate)
        if self._throttled != (port, ipv6_only):
            self.unthrottle()
            if ipv6_only:
                self.exec_("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ipv6", "prio", "1",
                           "u32", "match", "ip6", "sport", str(port), "0xffff", "flowid", "1:20")
            else:
                self.exec_("tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
                           "u32", "match", "ip", "sport", str(port), "0xffff", "flowid", "1:20")
            self._throttled = (port, ipv6_only)

    def slow_class(self) -> tuple[int, int, int, int]:
        """What the slow class has carried so far: (bytes sent, packets sent, bytes
        queued now, packets queued now; tc rounds the queued bytes to KiB). Bytes count what htb shapes: each packet's IP/TCP headers and
        the loopback's 14-byte link header included."""
        out = subprocess.run([*self.prefix(), "tc", "-s", "class", "show", "dev", "lo", "classid", "1:20"],
                             capture_output=True, text=True, check=True).stdout
        sent = re.search(r"Sent (\d+) bytes (\d+) pkt", out)
        backlog = re.search(r"backlog (\d+)([KM]?)b (\d+)p", out)
        if sent is None or backlog is None:
            raise RuntimeError(f"unexpected tc output: {out!r}")
        queued = int(backlog.group(1)) * {"": 1, "K": 1024, "M": 1 << 20}[backlog.group(2)]
        return int(sent.group(1)), int(sent.group(2)), queued, int(backlog.group(3))

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
