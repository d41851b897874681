"""The browser client in Debian's chromium against the real suite (``tensorwire up``).

Every figure comes from the browser's own APIs: Navigation and Paint Timing for
load and first contentful paint, a PerformanceObserver for long tasks,
requestAnimationFrame for the frame rate, and the page's ``window.tensorwire``
read-outs (server step, displayed step, lag) for liveness.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.e2e.conftest import Stack, browser, screenshot, settled_step, wait_http

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WINDOW_S = 10.0

# Started as soon as the measurement window opens: long tasks, rAF frames, and
# the page's lag and steps sampled every 100 ms.
PROBE = """() => {
  const probe = { long: [], frames: 0, lags: [], steps: [], t0: performance.now() };
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) probe.long.push(e.duration);
  }).observe({ type: "longtask" });
  const tick = () => { probe.frames++; requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  probe.timer = setInterval(() => {
    probe.lags.push(window.tensorwire.lagS);
    probe.steps.push(window.tensorwire.displayedStep);
  }, 100);
  window.__probe = probe;
}"""

READ_PROBE = """() => {
  const p = window.__probe;
  clearInterval(p.timer);
  const seconds = (performance.now() - p.t0) / 1000;
  return { long: p.long, fps: p.frames / seconds, lags: p.lags, steps: p.steps, seconds,
           frames: window.tensorwire.frames };
}"""


def live_page(context: Any, url: str, timeout_s: float = 20) -> Any:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_function("() => window.tensorwire && window.tensorwire.displayedStep > 0",
                           timeout=timeout_s * 1000)
    assert not errors, errors
    return page


def measure(page: Any, seconds: float = WINDOW_S) -> dict[str, Any]:
    page.evaluate(PROBE)
    page.wait_for_timeout(seconds * 1000)  # the measurement window itself
    return page.evaluate(READ_PROBE)


def report(name: str, figures: dict[str, Any]) -> None:
    lags = figures["lags"]
    print(f"\n[{name}] fps {figures['fps']:.1f}, long tasks {figures['long']}, "
          f"lag max {max(lags):.2f}s mean {sum(lags) / len(lags):.2f}s, "
          f"steps {figures['steps'][0]} -> {figures['steps'][-1]}, frames {figures['frames']}")


PAGE_TIMING = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const fcp = performance.getEntriesByName("first-contentful-paint")[0];
  return { load: nav.loadEventEnd, fcp: fcp ? fcp.startTime : null,
           transfer: performance.getEntriesByType("resource")
             .filter((r) => r.name.includes("/assets/"))
             .reduce((sum, r) => sum + r.transferSize, 0) };
}"""


def test_loads_fast_and_shows_the_run_learning(stack: Stack) -> None:
    # Measured on this 2-core machine at rest: load 850-980 ms, first paint 510-560 ms
    # since the dashboard (run store, chart tools, feedback) grew the bundle to 80 KiB;
    # the bounds keep a margin for a shared machine. A load spoiled by someone else's
    # burst (CI once read a first paint of 1112 ms after a load event at 1008 ms) is
    # measured again in a fresh context, at most twice; a page that is itself slow
    # fails every load. Making the first paint smaller is open work (issue 17).
    timings = []
    for _ in range(3):
        with browser() as context:
            page = context.new_page()
            page.goto(stack.url)
            page.wait_for_function("() => window.tensorwire && window.tensorwire.displayedStep > 0",
                                   timeout=20_000)
            timing = page.evaluate(PAGE_TIMING)
            print(f"\n[load] load event {timing['load']:.0f} ms, first contentful paint "
                  f"{timing['fcp']} ms, assets {timing['transfer']} bytes on the wire")
            timings.append(timing)
            if timing["load"] < 1500 and timing["fcp"] is not None and timing["fcp"] < 800:
                assert page.locator("#conn").inner_text() == "live"
                # The demo run is shown: its canvas view, its loss chart and the badge.
                page.wait_for_selector(".chart[data-series='loss']", timeout=10_000)
                assert "spiral" in page.locator("#view-title").inner_text().lower()
                assert "lag" in page.locator("#badge").inner_text()
                screenshot(page, "live")
                return
    pytest.fail(f"every load was slow: {timings}")


def smooth(figures: dict[str, Any]) -> list[str]:
    """What one measurement window got wrong (empty: all of the issue's bars met)."""
    problems = []
    steps, lags = figures["steps"], figures["lags"]
    if not steps[-1] > steps[0]:
        problems.append("the displayed step did not advance")
    if max(lags) >= 2.0:
        problems.append(f"lag reached {max(lags):.2f}s")
    if [d for d in figures["long"] if d > 50]:
        problems.append(f"long tasks {figures['long']} ms")
    if figures["fps"] < 55:
        problems.append(f"{figures['fps']:.1f} frames/s")
    return problems


def test_streams_smoothly_with_low_lag(stack: Stack) -> None:
    # This machine's 2 cores are shared with the services and, on a developer's
    # machine, with other work: a window spoiled by someone else's burst is
    # measured again, at most four times (CI at load 5-11 once spoiled three in a
    # row with long tasks of 60-260 ms). One clean 10 s window passes; a page that
    # itself drops frames or blocks its main thread fails every window.
    failures = []
    with browser() as context:
        page = live_page(context, stack.url)
        page.wait_for_timeout(1000)  # past the snapshot and first charts
        for window in range(5):
            figures = measure(page)
            report(f"stream, window {window + 1}", figures)
            problems = smooth(figures)
            if not problems:
                break
            failures.append(problems)
        screenshot(page, "streaming")
    assert len(failures) < 5, f"every 10 s window had problems: {failures}"


def test_pause_stops_the_step_and_resume_restarts_it(stack: Stack) -> None:
    with browser() as context:
        page = live_page(context, stack.url)
        try:
            page.click("#pause")
            page.wait_for_function("() => window.tensorwire.state === 'PAUSED'", timeout=10_000)
            paused_at = settled_step(page)  # frames of the last steps may still be on their way
            frames = page.evaluate("() => window.tensorwire.frames")
            page.wait_for_timeout(1500)  # a window in which the step may not move
            assert page.evaluate("() => window.tensorwire.serverStep") == paused_at
            assert page.evaluate("() => window.tensorwire.frames") > frames, "no keep-alive while paused"
            assert page.locator("#resume").is_enabled() and not page.locator("#pause").is_enabled()
            screenshot(page, "paused")
        finally:
            page.click("#resume")  # the other tests watch this run
        page.wait_for_function(f"() => window.tensorwire.serverStep > {paused_at}", timeout=10_000)
        page.wait_for_function(f"() => window.tensorwire.displayedStep > {paused_at}", timeout=10_000)
        # A status frame sent just before the resume (PAUSED) may land after Resume's
        # answer; the next one says RUNNING.
        page.wait_for_function("() => window.tensorwire.state === 'RUNNING'", timeout=5_000)


def test_reconnects_by_itself_after_the_gateway_restarts(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    gateway = stack.gateway(port, tmp_path / "gateway.log").start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 20)
        with browser() as context:
            page = live_page(context, f"http://127.0.0.1:{port}/?stall_ms=3000&backoff_max_ms=1000#token={stack.token}")
            gateway.stop(signal.SIGKILL)  # a crash: connections reset, nothing drains
            page.wait_for_function("() => window.tensorwire.connection !== 'connected'", timeout=10_000)
            shown = page.evaluate("() => window.tensorwire.displayedStep")
            screenshot(page, "reconnecting")
            gateway = stack.gateway(port, tmp_path / "gateway.log").start()
            page.wait_for_function(
                f"() => window.tensorwire.connection === 'connected' && "
                f"window.tensorwire.displayedStep > {shown}", timeout=20_000)
            assert page.locator("#conn").inner_text() == "live"
    finally:
        gateway.stop()


def test_inference_panel_answers_through_grpc_web(stack: Stack) -> None:
    with browser() as context:
        page = live_page(context, stack.url)
        # The run's checkpoints reach the inference service every few seconds. The run's
        # model is chosen in the same step that finds it (a model list refreshed between
        # finding and choosing once left nothing chosen: the drawing then asked nothing).
        # Loaded by itself (an unthrottled link is not judged slow), after the run list.
        page.wait_for_function("() => window.tensorwire.firstScreenBytesPerS > 0", timeout=20_000)
        figures = page.evaluate("() => [window.tensorwire.firstScreenBytesPerS, window.tensorwire.inferenceOnRequest]")
        assert figures[1] is False, f"an unthrottled page judged its link slow: {figures}"
        page.wait_for_function("() => document.querySelector('#model') !== null", timeout=20_000)
        model = page.wait_for_function("""() => {
          const select = document.querySelector("#model");
          const run = [...select.options].find((o) => o.value.startsWith("run-"));
          if (!run) {
            document.querySelector("#inference button").click();
            return false;
          }
          if (select.value !== run.value) {
            select.value = run.value;
            select.dispatchEvent(new Event("change"));
          }
          return run.value;
        }""", polling=1000, timeout=45_000).json_value()
        assert model.startswith("run-"), model
        page.wait_for_function("""(model) => document.querySelector('#model').value === model
            && document.querySelector('#infer-result').textContent.includes('inputs:')""", arg=model)
        box = page.locator("#pad").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=8)
        page.mouse.up()
        try:
            page.wait_for_function("() => document.querySelector('#infer-latency').textContent.includes('ms')",
                                   timeout=10_000)
        except Exception:
            screenshot(page, "inference-no-answer")
            print(page.evaluate("""() => ({ result: document.querySelector('#infer-result').textContent,
                latency: document.querySelector('#infer-latency').textContent,
                hint: document.querySelector('#infer-hint')?.textContent, model: document.querySelector('#model').value })"""))
            raise
        latency = page.locator("#infer-latency").inner_text()
        result = page.locator("#infer-result").inner_text()
        print(f"\n[inference] {latency}: {result}")
        assert "logits [1, 2]" in result and "P(class 1)" in result, result
        screenshot(page, "inference")
