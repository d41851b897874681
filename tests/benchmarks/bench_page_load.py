"""Page load of several builds of the web app over a throttled link, alternated.

Run as root (a network namespace whose gateway port sends at RATE, as in
tests/e2e/test_slow_link.py), with Debian's chromium::

    sudo .venv/bin/python tests/benchmarks/bench_page_load.py --rate 500kbit --loads 7 \
        old=/tmp/old/clients/web/dist new=clients/web/dist

Each build is a built ``clients/web/dist`` (``node build.mjs``; an older one from
``git archive <commit> clients/web | tar -x -C /tmp/old`` with node_modules linked).
Their assets (content-hashed, so they never clash) are served from one folder by one
suite (``tensorwire up`` and a demo run); before each load the build's index.html
becomes the page. Every load is a fresh chromium (empty cache), the builds taking
turns, so a machine whose load drifts spoils them alike. It prints each load (load
event, first contentful paint, first chart, the first screen's bytes on the wire, every
asset with its transfer size and when it was in) and per build the load event's
median, min and max, with the load average at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import Stack, browser
from tests.e2e.test_slow_link import chromium_in, throttled_namespace

LOADED = """() => {
  const nav = performance.getEntriesByType("navigation")[0], end = nav.loadEventEnd;
  const fcp = performance.getEntriesByName("first-contentful-paint")[0];
  const assets = performance.getEntriesByType("resource").filter((r) => r.name.includes("/assets/"));
  return { load: end, fcp: fcp ? fcp.startTime : 0, chart: window.tensorwire.firstChartMs,
           bytes: assets.filter((r) => r.responseEnd <= end).reduce((s, r) => s + r.transferSize, nav.transferSize),
           assets: assets.map((r) => [r.name.split("/").pop(), r.transferSize, Math.round(r.responseEnd)]) };
}"""
PAGE = ("index.html", "index.html.gz", "index.html.br")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="500kbit", help="tc rate of the gateway's port (default 500kbit)")
    parser.add_argument("--loads", type=int, default=7, help="loads per build (default 7)")
    parser.add_argument("builds", nargs="+", help="NAME=DIST (a built clients/web/dist)")
    args = parser.parse_args()
    builds = dict(b.split("=", 1) for b in args.builds)
    serve = Path(tempfile.mkdtemp(prefix="page-load-dist-"))
    (serve / "assets").mkdir()
    for name, dist in builds.items():
        for asset in Path(dist, "assets").iterdir():
            shutil.copy(asset, serve / "assets" / asset.name)
        for page in PAGE:
            if Path(dist, page).exists():
                shutil.copy(Path(dist, page), serve / f"{name}.{page}")
    os.environ["TENSORWIRE_GATEWAY_STATIC_DIR"] = str(serve)  # read by the gateway `up` starts

    work = Path(tempfile.mkdtemp(prefix="page-load-"))
    stack = Stack(work / "stack")
    stack.data_dir.mkdir()
    results: dict[str, list[dict]] = {name: [] for name in builds}
    with throttled_namespace(stack.web_port, args.rate) as netns:
        stack.netns = netns
        wrapper = chromium_in(netns, work)
        try:
            stack.start()
            stack.start_run("spiral")
            for i in range(args.loads):
                for name in builds:
                    for page in PAGE:
                        (serve / page).unlink(missing_ok=True)
                        if (serve / f"{name}.{page}").exists():
                            shutil.copy(serve / f"{name}.{page}", serve / page)
                    with browser(str(wrapper)) as context:
                        tab = context.new_page()
                        tab.goto(stack.url, timeout=60_000)
                        tab.wait_for_function("() => window.tensorwire && window.tensorwire.firstChartMs > 0",
                                              timeout=60_000)
                        got = tab.evaluate(LOADED)
                    results[name].append(got)
                    print(f"{i} {name}: load event {got['load']:.0f} ms, first paint {got['fcp']:.0f} ms, "
                          f"first chart {got['chart']:.0f} ms, first screen {got['bytes']} bytes; {got['assets']}",
                          flush=True)
        finally:
            stack.stop()
    for name, runs in results.items():
        loads = sorted(r["load"] for r in runs)
        print(f"{name}: load event median {statistics.median(loads):.0f} ms, min {loads[0]:.0f}, "
              f"max {loads[-1]:.0f} ({len(loads)} loads); first paint median "
              f"{statistics.median(r['fcp'] for r in runs):.0f} ms; first chart median "
              f"{statistics.median(r['chart'] for r in runs):.0f} ms; first screen {runs[0]['bytes']} bytes")
    print("load average", Path("/proc/loadavg").read_text().strip())


if __name__ == "__main__":
    main()
