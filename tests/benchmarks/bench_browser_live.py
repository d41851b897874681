"""Live lag in a real browser through the gateway, on throttled links.

Run as root (network namespaces and htb, as in tests/e2e/test_slow_link.py), with
Debian's chromium::

    sudo .venv/bin/python tests/benchmarks/bench_browser_live.py            # every scenario, ~6 min
    sudo .venv/bin/python tests/benchmarks/bench_browser_live.py --scenarios 32kbit,1mbit --seconds 30

Each scenario is a fresh namespace whose loopback sends from the page's port at the
scenario's rate, a fresh suite (``tensorwire up``, one spiral run) and a fresh
chromium inside it, so the page's assets, its stream and its acks all cross the
slow link. ``rtt300`` puts tests/support/delay_proxy.py (150 ms each way) in front
of the gateway and throttles the proxy's port at 256 kbit/s; ``step`` runs at
1 Mbit/s, drops to 64 kbit/s for 7 s and comes back, and reports how long after the
bandwidth returned the view on screen was last 0.5 s old or older.

From the first view on screen, after ``--warmup-s`` (5 s, as bench_live.py's direct
viewer), the page is sampled every 100 ms from its own read-outs
(``window.tensorwire``): the age of the view on screen (now minus its production
time on the servers' clock, the page's clock offset from its ack round trips), the
age of the newest scalars on the charts (the view's age plus the steps between the
view and the newest scalar step, over steps/s), and each status frame's lag on arrival
(produced -> arrived). It prints p50/p95/max of each, views per second, and how far
the age disagrees with the steps (server step minus the view's step, over steps/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port
from tests.e2e.conftest import CHROMIUM, Process, Stack, browser, ensure_bundle
from tests.e2e.test_slow_link import chromium_in, throttled_namespace

SCENARIOS = ("1mbit", "500kbit", "64kbit", "32kbit", "rtt300", "step")

SAMPLE = """() => {
  const t = window.tensorwire, now = Date.now() / 1000, off = t.clockOffsetS;
  return { t: now, view: t.viewProducedAt ? now - off - t.viewProducedAt : null,
           scalarStep: t.scalarStep, status: t.statusLagS, viewStep: t.viewStep, server: t.serverStep,
           sps: t.stepsPerS, acks: t.acks, views: t.views };
}"""

RECORD = """(seconds) => new Promise((resolve) => {
  const out = [], sample = SAMPLE, end = Date.now() + seconds * 1000;
  const timer = setInterval(() => {
    out.push(sample());
    if (Date.now() >= end) { clearInterval(timer); resolve(out); }
  }, 100);
})""".replace("SAMPLE", SAMPLE)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def set_rate(netns: str, rate: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "tc", "class", "change", "dev", "lo", "parent", "1:",
                    "classid", "1:20", "htb", "rate", rate, "ceil", rate], check=True, capture_output=True)


def summarize(samples: list[dict]) -> dict:
    views = [s["view"] for s in samples if s["view"] is not None]
    # the scalars' age: the view's (on the servers' clock) plus the steps between them
    scalars = [s["view"] + (s["viewStep"] - s["scalarStep"]) / s["sps"] for s in samples
               if s["view"] is not None and s["scalarStep"] and s["sps"] > 0]
    statuses = [s["status"] for i, s in enumerate(samples)
                if s["status"] and (i == 0 or s["status"] != samples[i - 1]["status"])]
    truth = [s["view"] - (s["server"] - s["viewStep"]) / s["sps"] for s in samples
             if s["view"] is not None and s["sps"] > 0 and s["viewStep"]]
    span = samples[-1]["t"] - samples[0]["t"] if len(samples) > 1 else 0
    return {
        "view_p50": pct(views, 0.5), "view_p95": pct(views, 0.95), "view_max": max(views, default=float("nan")),
        "scalars_p50": pct(scalars, 0.5), "scalars_p95": pct(scalars, 0.95),
        "status_p50": pct(statuses, 0.5), "status_p95": pct(statuses, 0.95), "statuses": len(statuses),
        "views_per_s": (samples[-1]["views"] - samples[0]["views"]) / span if span else 0.0,
        "age_minus_steps_p50": statistics.median(truth) if truth else float("nan"),
        "acks": samples[-1]["acks"] - samples[0]["acks"],
    }


def run_scenario(name: str, seconds: float, warmup_s: float, workdir: Path) -> dict:
    rate = {"rtt300": "256kbit", "step": "1mbit"}.get(name, name)
    stack = Stack(workdir / name)
    stack.data_dir.mkdir(parents=True)
    proxy_port = free_port()
    shaped = proxy_port if name == "rtt300" else stack.web_port
    with throttled_namespace(shaped, rate) as netns:
        stack.netns = netns
        wrapper = chromium_in(netns, workdir / name)
        proxy = None
        try:
            stack.start()
            stack.start_run("spiral")
            url = stack.url
            if name == "rtt300":
                proxy = Process(["ip", "netns", "exec", netns, sys.executable, "-m", "tests.support.delay_proxy",
                                 "--listen", str(proxy_port), "--target", f"127.0.0.1:{stack.web_port}",
                                 "--delay-ms", "150"], workdir / name / "proxy.log").start()
                proxy.wait_for_line("delaying", 10)
                url = url.replace(f":{stack.web_port}/", f":{proxy_port}/")
            with browser(str(wrapper)) as context:
                page = context.new_page()
                page.goto(url, timeout=120_000)
                page.wait_for_function("() => window.tensorwire && window.tensorwire.viewProducedAt > 0",
                                       timeout=120_000, polling=100)
                page.wait_for_timeout(warmup_s * 1000)
                if name != "step":
                    return summarize(page.evaluate(RECORD, seconds))
                before = page.evaluate(RECORD, 7)
                set_rate(netns, "64kbit")
                slow = page.evaluate(RECORD, 7)
                set_rate(netns, "1mbit")
                back = time.time()
                after = page.evaluate(RECORD, 8)
                late = [s["t"] for s in after if s["view"] is not None and s["view"] >= 0.5]
                result = summarize(before)
                result["slow_view_p95"] = summarize(slow)["view_p95"]
                # still 0.5 s old at the end of the 8 s after: not back (inf)
                recovered = not late or max(late) < after[-1]["t"] - 0.5
                result["recovery_s"] = (max(late) - back if late else 0.0) if recovered else float("inf")
                result["after_view_p95"] = summarize([s for s in after if s["t"] >= back + 1.0])["view_p95"]
                return result
        finally:
            if proxy is not None:
                proxy.stop()
            stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--seconds", type=float, default=20.0, help="sampled seconds per scenario (default 20)")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="after the first view (default 5)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each scenario, taking turns")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing (scripts/install-system-deps.sh installs it)", file=sys.stderr)
        return 2
    ensure_bundle()
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-browser-live-{os.getpid()}"
    print(f"logs in {workdir}; {args.seconds:g} s sampled after {args.warmup_s:g} s past the first view; "
          f"load average {os.getloadavg()[0]:.1f}")
    for repeat in range(args.repeats):
        for name in names:
            r = run_scenario(name, args.seconds, args.warmup_s, workdir / f"r{repeat}")
            line = (f"{name:>8}: view on screen p50 {r['view_p50']:.2f} p95 {r['view_p95']:.2f} "
                    f"max {r['view_max']:.2f} s; scalars p50 {r['scalars_p50']:.2f} p95 {r['scalars_p95']:.2f} s; "
                    f"status on arrival p50 {r['status_p50']:.2f} p95 {r['status_p95']:.2f} s "
                    f"({r['statuses']}); {r['views_per_s']:.1f} views/s, {r['acks']} acks; "
                    f"age - steps p50 {r['age_minus_steps_p50']:+.2f} s")
            if name == "step":
                line += (f"; during 64 kbit/s view p95 {r['slow_view_p95']:.2f} s; back under 0.5 s "
                         f"{r['recovery_s']:.2f} s after the bandwidth returned (then p95 {r['after_view_p95']:.2f} s)")
            print(line + f" [load {os.getloadavg()[0]:.1f}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
