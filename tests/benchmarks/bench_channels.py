"""Benchmark of the channel pool and chunked checkpoint transfer. Prints figures.

    .venv/bin/python tests/benchmarks/bench_channels.py [--quick]

1. Reuse rate of the pool over 10,000 calls (goal > 95 %).
2. RPS at concurrency 256, one grpc.aio channel vs the pool, against a server
   process whose handler takes ``--delay-s`` (an I/O-bound call, as a model
   forward waiting on a batch) and whose HTTP/2 connections allow 100 concurrent
   streams (the usual limit of Envoy, nginx and most gRPC servers); also against
   gRPC's default (no stream limit), for comparison.
3. A 100 MB checkpoint uploaded to a receiver process: time, throughput, wire
   bytes and peak RSS growth of sender and receiver, compression on and off, for
   random weights (incompressible) and pruned weights (75 % zeros).

The machine is shared and noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tensorwire.calls.channels import ChannelPool
from tensorwire.checkpoints.chunking import ChunkConfig, Compression
from tensorwire.checkpoints.upload import upload_checkpoint
from tests.support.echo_service import method, reset_peak_rss, running, status_kib


async def bench_reuse(port: int, calls: int) -> None:
    async with ChannelPool(f"127.0.0.1:{port}", max_size=8) as pool:
        sem = asyncio.Semaphore(64)

        async def one() -> None:
            async with sem, pool.acquire() as channel:
                await method(channel, "Echo")(b"ping", timeout=30)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(calls)))
        elapsed = time.perf_counter() - started
        m = pool.metrics
        print(f"reuse: {m.acquisitions} calls (64 concurrent) in {elapsed:.2f}s: "
              f"reuse rate {m.reuse_rate:.2%} ({m.reused} reused, {m.created} channels created)")
        print(f"       {pool!r}")


async def _rps(call_factory, concurrency: int, duration_s: float) -> tuple[float, int]:
    """Successful calls per second, and the number of failed calls."""
    stop = time.perf_counter() + duration_s
    done = failed = 0

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < stop:
            try:
                await call_factory()
                done += 1
            except grpc.aio.AioRpcError:
                failed += 1  # e.g. REFUSED_STREAM past the server's stream limit

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started), failed


async def bench_rps(port: int, concurrency: int, duration_s: float, label: str) -> None:
    results: dict[str, list[float]] = {"single channel": [], "pool": []}
    failures = {"single channel": 0, "pool": 0}
    for _ in range(2):  # alternate to even out the noise of a shared machine
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            sleep = method(channel, "Sleep")
            await sleep(b"w", timeout=30)
            rps, failed = await _rps(lambda: sleep(b"x", timeout=60), concurrency, duration_s)
            results["single channel"].append(rps)
            failures["single channel"] += failed
        async with ChannelPool(f"127.0.0.1:{port}", max_size=8, max_streams_per_channel=100) as pool:

            async def pooled() -> None:
                async with pool.acquire() as ch:
                    await method(ch, "Sleep")(b"x", timeout=60)

            await pooled()
            rps, failed = await _rps(pooled, concurrency, duration_s)
            results["pool"].append(rps)
            failures["pool"] += failed
            size = pool.metrics.created
    single = sum(results["single channel"]) / 2
    pooled_rps = sum(results["pool"]) / 2
    print(f"rps @ {concurrency} concurrent, {label}: single channel {single:,.0f} rps "
          f"({failures['single channel']} failed calls), pool ({size} channels) {pooled_rps:,.0f} rps "
          f"({failures['pool']} failed) -> pool/single = {pooled_rps / single:.2f}x")


def _make_checkpoint(path: Path, kind: str, total_mb: int) -> None:
    torch.manual_seed(0)
    n = total_mb * 1000 * 1000 // (4 * 1024 * 1024) + 1  # 4 MiB tensors
    state = {}
    for i in range(n):
        w = torch.randn(1024, 1024)
        if kind == "pruned":
            w[torch.rand(1024, 1024) < 0.75] = 0.0
        state[f"layer{i}.weight"] = w
    torch.save(state, path)


async def bench_transfer(tmp: Path, total_mb: int) -> None:
    for kind in ("random", "pruned"):
        ckpt = tmp / f"{kind}.pt"
        _make_checkpoint(ckpt, kind, total_mb)
        size = ckpt.stat().st_size
        for compression in (Compression.NONE, Compression.ZSTD):
            repo = tmp / f"repo-{kind}-{compression.name}"
            with running("--repository", str(repo)) as (port, pid):
                async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
                ) as channel:
                    # Warm-up upload: the receiver imports torch to check checkpoints.
                    warm = tmp / "warm.pt"
                    torch.save({"w": torch.zeros(16)}, warm)
                    await upload_checkpoint(channel, warm, model="warm", kind="spiral", timeout_s=120)
                    base_me, base_srv = status_kib("self", "VmRSS"), status_kib(pid, "VmRSS")
                    reset_peak_rss("self")
                    reset_peak_rss(pid)
                    started = time.perf_counter()
                    result = await upload_checkpoint(
                        channel, ckpt, model="big", kind="spiral",
                        config=ChunkConfig(compression=compression), timeout_s=600,
                    )
                    elapsed = time.perf_counter() - started
                    peak_me = (status_kib("self", "VmHWM") - base_me) / 1024
                    peak_srv = (status_kib(pid, "VmHWM") - base_srv) / 1024
            assert result.bytes == size
            print(f"transfer {size / 1e6:.0f} MB {kind:6s} weights, compression "
                  f"{compression.name.lower():4s}: {elapsed:5.2f}s ({size / 1e6 / elapsed:6.1f} MB/s), "
                  f"wire {result.wire_bytes / 1e6:6.1f} MB ({size / result.wire_bytes:.2f}x), "
                  f"{result.chunks} chunks, peak RSS growth sender {peak_me:.1f} MiB, "
                  f"receiver {peak_srv:.1f} MiB")
        ckpt.unlink()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, 20 MB transfer")
    parser.add_argument("--delay-s", type=float, default=0.02, help="server handler latency")
    args = parser.parse_args()
    duration = 2.0 if args.quick else 5.0
    print(f"bench_channels on {os.cpu_count()} cores (shared machine: compare ratios)")
    with running() as (port, _):
        await bench_reuse(port, 10_000)
    with running("--delay-s", str(args.delay_s), "--max-concurrent-streams", "100") as (port, _):
        await bench_rps(port, 256, duration,
                        f"server: {args.delay_s * 1000:.0f} ms handler, 100 streams/connection")
    with running("--delay-s", str(args.delay_s)) as (port, _):
        await bench_rps(port, 256, duration,
                        f"server: {args.delay_s * 1000:.0f} ms handler, gRPC default stream limit")
    with tempfile.TemporaryDirectory(prefix="bench-channels-") as tmp:
        await bench_transfer(Path(tmp), 20 if args.quick else 100)


if __name__ == "__main__":
    asyncio.run(main())
