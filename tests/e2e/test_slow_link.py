"""The browser client on a 1 Mbit/s link (root only: a network namespace whose
loopback is throttled by tc on the gateway's port). The lag must stay under 2 s:
the gateway writes a stream's next frame only once the previous one has left the
socket, so the streamer skips frames instead of queueing them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import CHROMIUM, Stack, browser, ensure_bundle, screenshot
from tests.e2e.test_browser import live_page, measure, report

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.root]

@contextlib.contextmanager
def throttled_namespace(port: int, rate: str = "1mbit") -> Iterator[str]:
    """A fresh network namespace whose loopback sends from ``port`` at ``rate`` only."""

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    netns = f"twd{uuid.uuid4().hex[:8]}"  # unique: several test runs may share a machine
    ip("netns", "add", netns)
    try:
        run = ["netns", "exec", netns]
        ip(*run, "ip", "link", "set", "dev", "lo", "up")
        ip(*run, "ip", "link", "set", "dev", "lo", "gso_max_segs", "1")
        ip(*run, "tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10")
        ip(*run, "tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb",
           "rate", "10gbit")
        ip(*run, "tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb",
           "rate", rate, "ceil", rate)
        ip(*run, "tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "u32",
           "match", "ip", "sport", str(port), "0xffff", "flowid", "1:20")
        yield netns
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
@pytest.mark.skipif(shutil.which("tc") is None, reason="tc (iproute2) is missing")
def test_lag_stays_low_on_a_1_mbit_link(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing")
    ensure_bundle()
    stack = Stack(tmp_path / "stack")
    stack.data_dir.mkdir()
    with throttled_namespace(stack.web_port) as netns:
        stack.netns = netns
        # Chromium runs inside the namespace too, so it reaches the throttled port.
        wrapper = tmp_path / "chromium-in-netns"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} "$@"\n')
        wrapper.chmod(0o755)
        try:
            stack.start()
            stack.start_run("spiral")
            with browser(str(wrapper)) as context:
                page = live_page(context, stack.url, timeout_s=30)
                page.wait_for_timeout(1000)
                figures = measure(page)
                report("1 Mbit/s", figures)
                screenshot(page, "throttled-1mbit")
                load = page.evaluate("""() => ({
                    load: performance.getEntriesByType("navigation")[0].loadEventEnd,
                    bytes: performance.getEntriesByType("resource")
                      .reduce((sum, r) => sum + r.transferSize, 0) })""")
                print(f"[1 Mbit/s] load event {load['load']:.0f} ms for {load['bytes']} bytes of assets")
        finally:
            stack.stop()
        # The link really is slow: the app's ~70 KB take over half a second.
        assert load["load"] > 8 * load["bytes"] / 1e6 * 1000 * 0.8, load
        steps, lags = figures["steps"], figures["lags"]
        assert steps[-1] > steps[0], "the displayed step did not advance"
        assert max(lags) < 2.0, f"lag reached {max(lags):.2f}s on 1 Mbit/s"
