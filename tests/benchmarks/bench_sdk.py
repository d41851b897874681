"""Benchmark of the SDK (tensorwire.init) in a training script. Prints figures.

    .venv/bin/python tests/benchmarks/bench_sdk.py [--pairs 10] [--steps 600] [--parts log,steps,memory]

A streamer and a trainer run as processes of their own (real sockets); the script
under test is this process.

1. Cost of ``run.log(step, **3 scalars)`` on the training thread: median and p99
   in µs over 200,000 calls (floats, then 0-d tensors), the background thread
   publishing meanwhile (goal: median <= 5 µs, p99 <= 50 µs).
2. The digits example's steps/s with the SDK (log + watch + should_stop +
   wait_if_paused, the run registered and published) vs the same loop without
   it, in alternating pairs; the median of the per-pair ratios (goal >= 0.98).
   On a loaded machine the wall-clock ratio mostly measures the neighbours, so
   the same pairs are also timed in CPU seconds: steps per CPU second of the
   training thread (what the SDK costs the loop itself) and of the whole
   process (the SDK's background thread included), which other processes'
   load does not change.
3. Resident memory growth of the process over a 100,000-step run logging 5
   scalars (goal <= 20 MB).

The machine is shared and noisy: the load average is printed with the figures;
read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "digits"))

import torch
import torch.nn.functional as F
from digits import DigitsCNN, load_digits_split

import tensorwire
from tests.support.ports import free_port


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def services() -> Iterator[tuple[str, str]]:
    """A streamer and a trainer, each its own process; yields their addresses."""
    sport, tport = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen([sys.executable, "-m", "services.streamer", "--port", str(sport),
                              "--metrics-port", "-1"], env=env, cwd=tmp,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([sys.executable, "-m", "services.trainer", "--port", str(tport),
                              "--metrics-port", "-1", "--streamer-target", f"127.0.0.1:{sport}",
                              "--inference-target", "", "--model-repository", f"{tmp}/models"],
                             env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        try:
            for port in (sport, tport):
                deadline = time.monotonic() + 120
                while True:
                    with socket.socket() as s:
                        if s.connect_ex(("127.0.0.1", port)) == 0:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"service on port {port} did not start")
                    time.sleep(0.2)
            yield f"127.0.0.1:{sport}", f"127.0.0.1:{tport}"
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)


def bench_log(streamer: str, trainer: str, calls: int = 200_000) -> None:
    run = tensorwire.init(task="bench-log", streamer=streamer, trainer=trainer)
    clock = time.perf_counter_ns
    for label, make in (("floats", lambda i: (0.5, 0.25, float(i))),
                        ("0-d tensors", lambda i: (torch.tensor(0.5), torch.tensor(0.25), torch.tensor(1.0)))):
        values = [make(i) for i in range(1000)]
        samples = []
        for i in range(calls):
            a, b, c = values[i % 1000]
            start = clock()
            run.log(i, loss=a, accuracy=b, lr=c)
            samples.append(clock() - start)
            if i % 1000 == 999:
                time.sleep(0.001)  # a training step's worth of time for the background thread
        samples.sort()
        median = samples[len(samples) // 2] / 1000
        p99 = samples[int(len(samples) * 0.99)] / 1000
        print(f"run.log, 3 scalars ({label}): median {median:.2f} µs, p99 {p99:.2f} µs "
              f"(goal: median <= 5, p99 <= 50)")
    run.finish()


class Rates(NamedTuple):
    wall: float
    """Steps per second of wall-clock time."""
    thread_cpu: float
    """Steps per CPU second of the training thread."""
    process_cpu: float
    """Steps per CPU second of the whole process (the SDK's thread included)."""


def train(steps: int, run: object | None, data: tuple) -> Rates:
    """The digits loop (as examples/digits/train.py); returns its step rates."""
    (x_train, y_train), _ = data
    torch.manual_seed(0)
    params = {"learning_rate": 1e-3, "batch_size": 64}
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=params["learning_rate"])
    if run is not None:
        run.watch(model)  # type: ignore[attr-defined]
    started, thread_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(x_train), (params["batch_size"],))
        logits = model(x_train[batch])
        loss = F.cross_entropy(logits, y_train[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = (logits.argmax(1) == y_train[batch]).float().mean()
        if run is not None:
            run.log(step, loss=loss, accuracy=accuracy)  # type: ignore[attr-defined]
            if run.should_stop:  # type: ignore[attr-defined]
                break
            run.wait_if_paused()  # type: ignore[attr-defined]
    return Rates(steps / (time.perf_counter() - started), steps / (time.thread_time() - thread_cpu),
                 steps / (time.process_time() - process_cpu))


def bench_steps(streamer: str, trainer: str, pairs: int, steps: int) -> None:
    data = load_digits_split()
    train(200, None, data)  # warm-up
    plain: list[Rates] = []
    tracked: list[Rates] = []
    for i in range(pairs):
        # Alternating order, one pair close in time: the drift of a shared machine cancels out.
        pair: dict[bool, Rates] = {}
        for with_sdk in ((False, True) if i % 2 == 0 else (True, False)):
            if with_sdk:
                run = tensorwire.init(task="bench-digits", params={"learning_rate": 1e-3},
                                      streamer=streamer, trainer=trainer)
                pair[True] = train(steps, run, data)
                run.finish()
            else:
                pair[False] = train(steps, None, data)
        plain.append(pair[False])
        tracked.append(pair[True])
    for field, what in (("wall", "steps/s"), ("thread_cpu", "steps per training-thread CPU second"),
                        ("process_cpu", "steps per process CPU second")):
        without = [getattr(r, field) for r in plain]
        with_sdk = [getattr(r, field) for r in tracked]
        ratios = [w / p for w, p in zip(with_sdk, without)]
        print(f"digits {what}: without SDK median {statistics.median(without):.0f} "
              f"{[round(x) for x in without]}, with SDK median {statistics.median(with_sdk):.0f} "
              f"{[round(x) for x in with_sdk]}; per-pair ratios {[round(r, 3) for r in ratios]}, "
              f"median {statistics.median(ratios):.3f} (goal >= 0.98)")


def bench_memory(streamer: str, trainer: str, steps: int = 100_000) -> None:
    run = tensorwire.init(task="bench-memory", streamer=streamer, trainer=trainer)
    for step in range(1, 2001):
        run.log(step, loss=1.0 / step, accuracy=0.5, lr=1e-3, grad_norm=2.0, tokens=float(step))
    time.sleep(0.5)
    before = rss_mb()
    for step in range(2001, steps + 1):
        run.log(step, loss=1.0 / step, accuracy=0.5, lr=1e-3, grad_norm=2.0, tokens=float(step))
        if step % 500 == 0:
            time.sleep(0.002)
    time.sleep(1.0)
    after = rss_mb()
    run.finish()
    print(f"RSS growth over a {steps:,}-step run with 5 scalars: {after - before:+.1f} MB "
          f"({before:.0f} -> {after:.0f} MB; goal <= 20 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--parts", default="log,steps,memory", help="which of log,steps,memory to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(1)
    with services() as (streamer, trainer):
        print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, {os.cpu_count()} CPUs")
        if "log" in parts:
            bench_log(streamer, trainer)
        if "steps" in parts:
            bench_steps(streamer, trainer, args.pairs, args.steps)
        if "memory" in parts:
            bench_memory(streamer, trainer)
        print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")


if __name__ == "__main__":
    main()
