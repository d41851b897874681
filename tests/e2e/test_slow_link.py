"""The browser client on a 1 Mbit/s link (root only: a network namespace whose
loopback is throttled by tc on the gateway's port). The lag must stay under 2 s:
the gateway writes a stream's next frame only once the previous one has left the
socket, so the streamer skips frames instead of queueing them. The page estimates
its link from its first screen: at 500 kbit/s that screen comes without the charts'
code, which follows the first view; at 64 kbit/s the charts' code comes before the
live stream starts, so it never shares the link with it.
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
        finally:
            stack.stop()
        # The link really is slow: the app's ~70 KB take over half a second.
        assert load["load"] > 8 * load["bytes"] / 1e6 * 1000 * 0.8, load
        steps, lags = figures["steps"], figures["lags"]
        assert steps[-1] > steps[0], "the displayed step did not advance"
        assert max(lags) < 2.0, f"lag reached {max(lags):.2f}s on 1 Mbit/s"


# What the page loaded and when: the load event, the first screen's bytes (the
# assets in by the load event, with the page), the assets that came after it, when
# the charts' code was in (charts-*.js and the chunks it imports: every asset that is
# neither the entry, nor preloaded with it, nor the inference panel's), and the
# page's own figures: its link estimate, whether it fetched the charts' code before
# the live stream, when the stream started, the first view and the first chart.
LOADED = """() => {
  const nav = performance.getEntriesByType("navigation")[0], end = nav.loadEventEnd;
  const fcp = performance.getEntriesByName("first-contentful-paint")[0];
  const assets = performance.getEntriesByType("resource").filter((r) => r.name.includes("/assets/"));
  const first = new Set([...document.querySelectorAll("script[src], link[rel=modulepreload]")]
    .map((e) => new URL(e.src || e.href, location.href).href));
  const charts = assets.filter((r) => !first.has(r.name) && !r.name.includes("/inference-"));
  const t = window.tensorwire;
  return { load: end, fcp: fcp ? fcp.startTime : null, view: t.firstViewMs, chart: t.firstChartMs,
           subscribed: t.subscribedMs, linkKbps: t.linkKbps, chartsFirst: t.chartsBeforeStream,
           bytes: assets.filter((r) => r.responseEnd <= end).reduce((sum, r) => sum + r.transferSize, nav.transferSize),
           later: assets.filter((r) => r.responseEnd > end).map((r) => r.name.split("/").pop()),
           charts: charts.length > 1 ? Math.max(...charts.map((r) => r.responseEnd)) : 0 };
}"""


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
@pytest.mark.skipif(shutil.which("tc") is None, reason="tc (iproute2) is missing")
def test_the_page_loads_its_first_screen_first_at_500_kbit(tmp_path: Path) -> None:
    """At 500 kbit/s the first screen (44.5 KiB gzip, 41 KB brotli on the wire:
    without the charts' uPlot, which the page fetches after the first view on a
    link this fast, and without Connect's JSON serialization) loads in under a
    second, and the charts follow the live view. Measured at a load average of 4-11
    on the 2 shared cores: load event 0.66-1.45 s (median 0.9 s); a load spoiled by someone else's burst (or a link
    estimate it pushed under the page's 256 kbit/s bound) is measured again in a
    fresh browser, at most twice."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing")
    ensure_bundle()
    stack = Stack(tmp_path / "stack")
    stack.data_dir.mkdir()
    tries = []
    with throttled_namespace(stack.web_port, "500kbit") as netns:
        stack.netns = netns
        wrapper = chromium_in(netns, tmp_path)
        try:
            stack.start()
            stack.start_run("spiral")
            for _ in range(3):
                with browser(str(wrapper)) as context:
                    page = context.new_page()
                    page.goto(stack.url, timeout=60_000)
                    page.wait_for_function("() => window.tensorwire && window.tensorwire.firstChartMs > 0",
                                           timeout=60_000)
                    got = page.evaluate(LOADED)
                    print(f"\n[500 kbit/s] load event {got['load']:.0f} ms, first paint {got['fcp']:.0f} ms, "
                          f"{got['bytes']} bytes; link {got['linkKbps']} kbit/s (charts before the stream: "
                          f"{got['chartsFirst']}); first view {got['view']:.0f} ms, first chart "
                          f"{got['chart']:.0f} ms; after the load: {got['later']}")
                    tries.append(got)
                    if got["load"] < 2000 and not got["chartsFirst"]:
                        screenshot(page, "throttled-500kbit-load")
                        break
        finally:
            stack.stop()
    # The first screen stays small whatever the machine does: the charts' code is not
    # in it (the bytes are the link's, not the CPU's), on every load that measured
    # the link as fast.
    for got in tries:
        if not got["chartsFirst"]:
            assert got["bytes"] < 48_000, got
            assert any(name.startswith("charts-") for name in got["later"]), got
    assert got["load"] < 2000 and not got["chartsFirst"], f"every load was slow or measured a slow link: {tries}"
    # The link really is slow: the first screen's bytes take most of the load's time.
    assert got["load"] > 8 * got["bytes"] / 500e3 * 1000 * 0.8, got
    # On this link the live view comes first, the charts after it.
    assert got["linkKbps"] >= 256, got
    assert 0 < got["view"] <= got["chart"], got
    assert got["charts"] > got["subscribed"], got


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
                loaded = page.evaluate(LOADED)
                screenshot(page, "throttled-64kbit")
        finally:
            stack.stop()
    lags = sorted(s["lag"] for s in samples)
    print(f"[64 kbit/s, gateway] badge lag p50 {lags[50]:.2f}s p95 {lags[95]:.2f}s, "
          f"acks {samples[-1]['acks']}; load event {loaded['load']:.0f} ms, link {loaded['linkKbps']} kbit/s, "
          f"stream from {loaded['subscribed']:.0f} ms, first view {loaded['view']:.0f} ms")
    # A slow link: the charts' code came before the live stream started, so it never
    # shared the link with it (fetched after the first view, it took the view lag p95
    # from 0.65 s to 4.6 s).
    assert 0 < loaded["linkKbps"] < 256 and loaded["chartsFirst"], loaded
    assert 0 < loaded["charts"] <= loaded["subscribed"], loaded
    assert samples[-1]["acks"] > samples[0]["acks"] > 0, "the page sent no acks through the gateway"
    assert samples[-1]["view"] > samples[0]["view"], "the view did not advance"
    for s in samples:
        if s["sps"] > 0 and s["view"]:
            # the badge may not claim the view is fresher than the steps prove (the
            # status's steps/s is an average of a trainer sharing 2 busy cores)
            assert s["lag"] >= 0.75 * (s["server"] - s["view"]) / s["sps"] - 0.25, s
    assert lags[95] < 1.5, f"view lag p95 {lags[95]:.2f}s at 64 kbit/s through the gateway"
