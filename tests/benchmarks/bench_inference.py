"""Inference throughput, in one run: the Python ceiling vs tensorwire.

    .venv/bin/python tests/benchmarks/bench_inference.py [--duration-s 5] [--perf-analyzer auto|off]

Servers (each its own process, on 127.0.0.1):
- ``echo``: a bare grpc.aio server answering ModelInfer with its inputs (protobuf
  parse + serialize, nothing else): the ceiling of a one-process Python server;
- ``tensorwire``: ``python -m services.inference`` (interceptor, validation,
  batcher, torch forward in a thread) on the spiral MLP (2-16-16-2);
- ``tensorwire x2``: the same with ``--workers 2`` (SO_REUSEPORT).

Load: a Python grpc.aio closed-loop generator in its own process at
concurrency 1, 16, 64 (the issue's reference figures were measured with a
Python load generator), and perf_analyzer (C++, the tritonclient wheel's binary)
when its libraries are present (Debian libb64-0d, libcudart.so.12 on
LD_LIBRARY_PATH; set TW_CUDART_DIR to the folder holding it). Prints RPS, p50,
p99 and the ratio to the ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONCURRENCY = (1, 16, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the ceiling: a bare echo server ---------------------------------------------


def run_echo(port: int) -> None:
    import grpc

    from tensorwire.inference import grpc_service_pb2 as pb

    async def infer(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for tensor in request.inputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response

    meta = pb.ModelMetadataResponse(
        name="spiral", versions=["1"], platform="pytorch_libtorch",
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name="points", datatype="FP32", shape=[-1, 2])],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(name="points", datatype="FP32", shape=[-1, 2])],
    )

    async def metadata(request: object, context: object) -> pb.ModelMetadataResponse:
        return meta

    async def config(request: object, context: object) -> pb.ModelConfigResponse:
        from tensorwire.inference import model_config_pb2 as mc

        cfg = mc.ModelConfig(name="spiral", platform="pytorch_libtorch", max_batch_size=64)
        cfg.input.add(name="points", data_type=mc.TYPE_FP32, dims=[2])
        cfg.output.add(name="points", data_type=mc.TYPE_FP32, dims=[2])
        return pb.ModelConfigResponse(config=cfg)

    async def server_metadata(request: object, context: object) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="echo", version="0")

    def unary(fn, req, resp):  # type: ignore[no-untyped-def]
        return grpc.unary_unary_rpc_method_handler(fn, req.FromString, resp.SerializeToString)

    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": unary(infer, pb.ModelInferRequest, pb.ModelInferResponse),
        "ModelMetadata": unary(metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": unary(config, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ServerMetadata": unary(server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    })

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


# -- load generator (its own process) -----------------------------------------------


def run_load(target: str, concurrency: int, duration_s: float, warmup_s: float) -> dict[str, float]:
    import grpc
    import numpy as np

    from tensorwire.inference import grpc_service_pb2 as pb
    from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc

    x = np.random.default_rng(0).standard_normal((1, 2)).astype(np.float32)
    request = pb.ModelInferRequest(
        model_name="spiral",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="points", datatype="FP32", shape=[1, 2])],
        raw_input_contents=[x.tobytes()],
    )

    async def main() -> dict[str, float]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(request, timeout=60, wait_for_ready=True)
            latencies: list[float] = []
            errors = 0
            start = time.perf_counter()
            measure_from = start + warmup_s
            end = measure_from + duration_s

            async def worker() -> None:
                nonlocal errors
                while True:
                    t0 = time.perf_counter()
                    if t0 >= end:
                        return
                    try:
                        await stub.ModelInfer(request, timeout=30)
                    except grpc.aio.AioRpcError:
                        errors += 1
                        continue
                    t1 = time.perf_counter()
                    if t0 >= measure_from:
                        latencies.append(t1 - t0)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            lat = np.array(latencies)
            return {
                "rps": len(lat) / duration_s,
                "p50_ms": float(np.percentile(lat, 50) * 1e3),
                "p99_ms": float(np.percentile(lat, 99) * 1e3),
                "errors": errors,
            }

    return asyncio.run(main())


def load_in_process(target: str, concurrency: int, duration_s: float, warmup_s: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen", target, str(concurrency), str(duration_s), str(warmup_s)],
        capture_output=True, text=True, timeout=duration_s + warmup_s + 120, cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- perf_analyzer ---------------------------------------------------------------------


def perf_analyzer_env() -> dict[str, str] | None:
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        return None
    env = dict(os.environ)
    cudart = os.environ.get("TW_CUDART_DIR", "")
    if cudart:
        env["LD_LIBRARY_PATH"] = cudart + ":" + env.get("LD_LIBRARY_PATH", "")
    probe = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env)
    if "not found" in probe.stdout:
        return None
    return env


def perf_analyzer(target: str, concurrency: int, duration_s: float, env: dict[str, str],
                  model: str = "spiral") -> dict[str, float]:
    binary = Path(sys.executable).parent / "perf_analyzer"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pa.csv"
        cmd = [str(binary), "-m", model, "-u", target, "-i", "grpc",
               "--concurrency-range", f"{concurrency}:{concurrency}",
               "--measurement-interval", str(int(duration_s * 1000)),
               # A shared 2-core machine is never "stable" by perf_analyzer's default 10 %.
               "--stability-percentage", "100", "--max-trials", "5", "-f", str(report)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration_s * 10 + 120)
        if out.returncode != 0 or not report.exists():
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
        row = next(csv.DictReader(report.open()))
    return {
        "rps": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
        "errors": 0,
    }


# -- servers ------------------------------------------------------------------------


def start_server(kind: str, repo: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "echo":
        cmd = [sys.executable, __file__, "--echo-server", str(port)]
    else:
        workers = "2" if kind.endswith("x2") else "1"
        cmd = [sys.executable, "-m", "services.inference", "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", "-1", "--model-repository", str(repo), "--poll-interval-s", "0",
               "--workers", workers, "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"127.0.0.1:{port}"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its (multi-process mode) children, from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended since the listing
            continue
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--perf-analyzer", choices=("auto", "off"), default="auto")
    parser.add_argument("--servers", default="echo,tensorwire,tensorwire x2",
                        help="comma-separated subset of: echo, tensorwire, tensorwire x2")
    parser.add_argument("--loadgen", nargs=4, metavar=("TARGET", "C", "DURATION", "WARMUP"))
    parser.add_argument("--echo-server", type=int, metavar="PORT")
    args = parser.parse_args()
    if args.echo_server:
        run_echo(args.echo_server)
        return 0
    if args.loadgen:
        target, c, d, w = args.loadgen
        print(json.dumps(run_load(target, int(c), float(d), float(w))))
        return 0

    import torch

    from tensorwire import modelrepo
    from tensorwire.models import build_model

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    repo = tmp / "models"
    torch.manual_seed(0)
    modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral").state_dict())
    pa_env = perf_analyzer_env() if args.perf_analyzer == "auto" else None
    generators = [("python", None)] + ([("perf_analyzer", pa_env)] if pa_env else [])
    results: dict[tuple[str, str, int], dict[str, float]] = {}
    print(f"bench_inference: {os.cpu_count()} cores, {args.duration_s:g}s per point, spiral MLP, batch 1 requests")
    if not pa_env and args.perf_analyzer == "auto":
        print("perf_analyzer: libraries missing (libb64-0d, libcudart.so.12 via TW_CUDART_DIR); Python generator only")
    # All servers start first (idle ones cost nothing); each point is then measured for
    # every server back to back, so the ratios compare neighbours in time on a machine
    # whose background load drifts.
    procs = {server: start_server(server, repo) for server in servers}
    try:
        for gen, env in generators:
            for c in CONCURRENCY:
                for server in servers:
                    proc, target = procs[server]
                    cpu0 = cpu_seconds(proc.pid)
                    if gen == "python":
                        r = load_in_process(target, c, args.duration_s, args.warmup_s)
                        # Server CPU per request: steadier than RPS on a shared machine
                        # (includes the warm-up's requests, so slightly high).
                        served = r["rps"] * (args.duration_s + args.warmup_s)
                        r["cpu_us"] = (cpu_seconds(proc.pid) - cpu0) / max(served, 1) * 1e6
                    else:
                        try:
                            r = perf_analyzer(target, c, args.duration_s, env)  # type: ignore[arg-type]
                        except RuntimeError as exc:
                            print(f"  perf_analyzer {server} c={c}: failed: {str(exc)[-200:]}")
                            r = {"rps": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"),
                                 "errors": -1}
                        r["cpu_us"] = float("nan")  # perf_analyzer runs an unknown number of windows
                    results[(gen, server, c)] = r
                    print(f"  {gen:13s} {server:13s} c={c:<3d} {r['rps']:8.0f} rps  "
                          f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                          f"server cpu {r['cpu_us']:5.0f} us/req  errors {r['errors']}", flush=True)
    finally:
        for proc, _ in procs.values():
            stop_server(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    load1, load5, _ = os.getloadavg()
    print(f"\nload average during the run (1/5 min): {load1:.1f} / {load5:.1f} on {os.cpu_count()} cores")

    print("\nsummary (ratio = RPS / echo RPS, same concurrency and generator; "
          "cpu x = server CPU per request / echo's)")
    print(f"  {'generator':13s} {'server':13s} {'c':>3s} {'rps':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
          f"{'ratio':>6s} {'cpu x':>6s}")
    for gen, _ in generators:
        for server in servers:
            for c in CONCURRENCY:
                r = results[(gen, server, c)]
                echo = results.get((gen, "echo", c), {"rps": float("nan"), "cpu_us": float("nan")})
                print(f"  {gen:13s} {server:13s} {c:3d} {r['rps']:8.0f} {r['p50_ms']:7.2f} "
                      f"{r['p99_ms']:7.2f} {r['rps'] / echo['rps']:6.2f} {r['cpu_us'] / echo['cpu_us']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
