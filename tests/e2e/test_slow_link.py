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


def chromium_in(netns: str, folder: Path) -> Path:
    """A chromium executable that runs inside ``netns``, so it reaches the throttled port."""
    wrapper = folder / "chromium-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


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
        wrapper = chromium_in(netns, tmp_path)
        try:
            stack.start()
            stack.start_run("spiral")
            with browser(str(wrapper)) as context:
                page = live_page(context, stack.url, timeout_s=30)
                page.wait_for_timeout(1000)
                figures = measure(page)
                report("1 Mbit/s", figures)
                screenshot(page, "throttled-1mbit")
                # Only what the load event waited for: the page's assets, not the gRPC-Web
                # calls (their streams keep counting bytes long after the load).
                load = page.evaluate("""() => {
                    const nav = performance.getEntriesByType("navigation")[0], end = nav.loadEventEnd;
                    return { load: end, bytes: performance.getEntriesByType("resource")
                      .filter((r) => r.initiatorType !== "fetch" && r.responseEnd <= end)
                      .reduce((sum, r) => sum + r.transferSize, nav.transferSize) }; }""")
                print(f"[1 Mbit/s] load event {load['load']:.0f} ms for {load['bytes']} bytes of assets")
                # Not a slow link for the page: the inference panel loads by itself.
                page.wait_for_function("() => window.tensorwire.firstScreenBytesPerS > 0", timeout=20_000)
                on_request = page.evaluate("() => window.tensorwire.inferenceOnRequest")
                page.wait_for_selector("#model", timeout=30_000)
        finally:
            stack.stop()
        # The link really is slow: the app's ~70 KB take over half a second.
        assert load["load"] > 8 * load["bytes"] / 1e6 * 1000 * 0.8, load
        assert on_request is False
        steps, lags = figures["steps"], figures["lags"]
        assert steps[-1] > steps[0], "the displayed step did not advance"
        assert max(lags) < 2.0, f"lag reached {max(lags):.2f}s on 1 Mbit/s"


TRUTH = """() => new Promise((resolve) => {
  const out = [];
  const timer = setInterval(() => {
    const t = window.tensorwire;
    out.push({ lag: t.lagS, server: t.serverStep, view: t.viewStep, sps: t.stepsPerS, acks: t.acks });
    if (out.length >= 100) { clearInterval(timer); resolve(out); }
  }, 100);
})"""


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
@pytest.mark.skipif(shutil.which("tc") is None, reason="tc (iproute2) is missing")
def test_64_kbit_gateway_with_feedback_and_a_truthful_badge(tmp_path: Path) -> None:
    """At 64 kbit/s the page acknowledges frames through the gateway, and its lag
    badge is the age of the view on screen: never below what the steps say
    (server step seen minus the view's step, over steps/s)."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing")
    ensure_bundle()
    stack = Stack(tmp_path / "stack")
    stack.data_dir.mkdir()
    with throttled_namespace(stack.web_port, "64kbit") as netns:
        stack.netns = netns
        wrapper = chromium_in(netns, tmp_path)
        try:
            stack.start()
            stack.start_run("spiral")
            with browser(str(wrapper)) as context:
                page = context.new_page()
                page.goto(stack.url, timeout=60_000)
                try:
                    page.wait_for_function("() => window.tensorwire && window.tensorwire.viewStep > 0",
                                           timeout=60_000)
                except Exception:
                    screenshot(page, "throttled-64kbit-no-view")
                    state = page.evaluate("""() => window.tensorwire && ({
                        frames: window.tensorwire.frames, connection: window.tensorwire.connection,
                        server: window.tensorwire.serverStep, acks: window.tensorwire.acks,
                        text: document.body.innerText.slice(0, 400) })""")
                    raise AssertionError(f"no view on screen within 60 s: {state}") from None
                page.wait_for_timeout(4000)  # past the snapshot
                samples = page.evaluate(TRUTH)
                screenshot(page, "throttled-64kbit")
                # A slow link: the inference panel (its code and first calls) waits to
                # be asked for, so that the live view comes first; then it loads.
                panel = page.evaluate("() => [window.tensorwire.firstScreenBytesPerS, window.tensorwire.inferenceOnRequest]")
                page.click("#load-inference")
                page.wait_for_selector("#model", timeout=30_000)
        finally:
            stack.stop()
    lags = sorted(s["lag"] for s in samples)
    print(f"[64 kbit/s, gateway] badge lag p50 {lags[50]:.2f}s p95 {lags[95]:.2f}s, "
          f"acks {samples[-1]['acks']}; first screen {panel[0]:.0f} B/s")
    assert panel[1] is True, f"a 64 kbit/s link was not judged slow: {panel}"
    assert samples[-1]["acks"] > samples[0]["acks"] > 0, "the page sent no acks through the gateway"
    assert samples[-1]["view"] > samples[0]["view"], "the view did not advance"
    for s in samples:
        if s["sps"] > 0 and s["view"]:
            # the badge may not claim the view is fresher than the steps prove (the
            # status's steps/s is an average of a trainer sharing 2 busy cores)
            assert s["lag"] >= 0.75 * (s["server"] - s["view"]) / s["sps"] - 0.25, s
    assert lags[95] < 1.5, f"view lag p95 {lags[95]:.2f}s at 64 kbit/s through the gateway"
