"""Multi-process mode: two worker processes share one port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np

from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(p) for p in text)
    return found


def worker_pids(pid: int) -> set[int]:
    """Children whose command line runs a worker (spawn's children run multiprocessing)."""
    pids = set()
    for child in children(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            pids.add(child)
    return pids


async def test_two_workers_share_the_port(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral").state_dict())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference", "--workers", "2", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "-1", "--http-port", "-1", "--model-repository", str(repo),
         "--poll-interval-s", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                              options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(12)]
        x = np.ones((1, 2), np.float32)
        request = pb.ModelInferRequest(
            model_name="spiral",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="points", datatype="FP32", shape=[1, 2])],
            raw_input_contents=[x.tobytes()],
        )
        replies = await asyncio.gather(*(
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=60, wait_for_ready=True)
            for ch in channels
        ))
        assert all(r.model_version == "1" for r in replies)
        assert len(worker_pids(proc.pid)) == 2
        # Each worker keeps its own statistics; over 12 connections both workers answered
        # (the kernel hashes connections over the listening sockets), so no single worker
        # saw every request.
        counts = []
        for ch in channels:
            stats = await pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
                pb.ModelStatisticsRequest(name="spiral"), timeout=10)
            counts.append(stats.model_stats[0].inference_count)
        assert max(counts) < 12, counts
        for ch in channels:
            await ch.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
