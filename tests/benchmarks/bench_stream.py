"""ModelStreamInfer throughput: the Python frontend vs the native one, paired.

    .venv/bin/python tests/benchmarks/bench_stream.py [--inflight 16] [--duration-s 4] [--rounds 3]

Two servers of the same spiral MLP repository (``python -m services.inference
--frontend python`` and ``--frontend native``, one worker each, their own
processes). The load: one bidi stream from a grpc.aio client in its own process
that keeps ``--inflight`` batch-1 messages outstanding (a new one per answer).
Each round measures both servers back to back, in alternating order; prints per
round answers/s, server CPU per message (from /proc) and the native/python ratio,
the medians, and the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_inference import cpu_seconds, start_server, stop_server

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def run_stream_load(target: str, inflight: int, duration_s: float, warmup_s: float) -> dict[str, float]:
    """One stream, ``inflight`` messages outstanding; answers per second after the warm-up."""
    import grpc
    import numpy as np

    from tensorwire.inference import grpc_service_pb2 as pb

    x = np.random.default_rng(0).standard_normal((1, 2)).astype(np.float32)
    spec = pb.ModelInferRequest.InferInputTensor(name="points", datatype="FP32", shape=[1, 2])
    body = pb.ModelInferRequest(model_name="spiral", inputs=[spec], raw_input_contents=[x.tobytes()]).SerializeToString()

    async def main() -> dict[str, float]:
        async with grpc.aio.insecure_channel(target) as channel:
            await channel.channel_ready()
            outbox: asyncio.Queue[bytes | None] = asyncio.Queue()

            async def send():  # type: ignore[no-untyped-def]
                while (item := await outbox.get()) is not None:
                    yield item

            for _ in range(inflight):
                outbox.put_nowait(body)
            start = time.perf_counter()
            measure_from, end = start + warmup_s, start + warmup_s + duration_s
            counted = errors = 0
            call = channel.stream_stream(STREAM)(send(), timeout=duration_s + warmup_s + 60)
            async for answer in call:
                now = time.perf_counter()
                if answer[:1] == b"\x0a":  # error_message (field 1) set
                    errors += 1
                if now >= end:
                    outbox.put_nowait(None)
                    continue
                if now >= measure_from:
                    counted += 1
                outbox.put_nowait(body)
            return {"rps": counted / duration_s, "errors": errors}

    return asyncio.run(main())


def measure(target: str, pid: int, inflight: int, duration_s: float, warmup_s: float) -> dict[str, float]:
    cpu0 = cpu_seconds(pid)
    out = subprocess.run([sys.executable, __file__, "--loadgen", target, str(inflight), str(duration_s),
                          str(warmup_s)], capture_output=True, text=True, timeout=duration_s + warmup_s + 120,
                         cwd=ROOT)
    cpu = cpu_seconds(pid) - cpu0
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    answers = result["rps"] * duration_s
    result["cpu_us"] = cpu / max(1.0, answers * (duration_s + warmup_s) / duration_s) * 1e6
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loadgen", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        target, inflight, duration, warmup = args.loadgen
        print(json.dumps(run_stream_load(target, int(inflight), float(duration), float(warmup))))
        return 0

    import torch

    from tensorwire import modelrepo
    from tensorwire.serving.models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        torch.manual_seed(0)
        modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral").state_dict(),
                                config_overrides={"max_batch_size": 64})
        servers = {kind: start_server(kind, repo) for kind in ("tensorwire", "tensorwire native")}
        try:
            load_before = os.getloadavg()
            for proc, target in servers.values():  # ready, and warm
                measure(target, proc.pid, args.inflight, 1.0, 1.0)
            rows: dict[str, list[dict[str, float]]] = {kind: [] for kind in servers}
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for kind in order:
                    proc, target = servers[kind]
                    rows[kind].append(measure(target, proc.pid, args.inflight, args.duration_s, args.warmup_s))
                py, nat = rows["tensorwire"][-1], rows["tensorwire native"][-1]
                print(f"round {r + 1}: python {py['rps']:7.0f}/s {py['cpu_us']:6.0f} us CPU/msg | native "
                      f"{nat['rps']:7.0f}/s {nat['cpu_us']:6.0f} us CPU/msg | native/python "
                      f"{nat['rps'] / max(py['rps'], 1e-9):.2f}x RPS, {nat['cpu_us'] / max(py['cpu_us'], 1e-9):.2f}x CPU"
                      f" (errors {py['errors']:.0f}/{nat['errors']:.0f})", flush=True)
            load_after = os.getloadavg()
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    med = {k: (statistics.median(x["rps"] for x in v), statistics.median(x["cpu_us"] for x in v))
           for k, v in rows.items()}
    ratios = [n["rps"] / p["rps"] for p, n in zip(rows["tensorwire"], rows["tensorwire native"])]
    print(f"ModelStreamInfer, one stream, {args.inflight} in flight, batch-1 messages, median of {args.rounds}:")
    print(f"  python frontend: {med['tensorwire'][0]:.0f} answers/s, {med['tensorwire'][1]:.0f} us server CPU/msg")
    print(f"  native frontend: {med['tensorwire native'][0]:.0f} answers/s, "
          f"{med['tensorwire native'][1]:.0f} us server CPU/msg")
    print(f"  native/python RPS per round: {', '.join(f'{x:.2f}x' for x in ratios)}")
    print(f"  load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
