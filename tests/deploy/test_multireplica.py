"""Several replicas on one machine, as the Kubernetes manifests run them.

- Two streamer processes and a trainer publishing to both through the endpoint
  list (what the headless Service's DNS name resolves to in a cluster): a viewer
  of either replica sees the same run, live.
- Two inference workers behind one client's pooled endpoint list share the load.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tensorwire.client import InferenceClient
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.streamer.v1 import streamer_pb2_grpc as spb_grpc
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc
from tests.conftest import free_port

from .processes import running

pytestmark = pytest.mark.slow


@dataclass
class Viewer:
    """What one browser-like subscriber of one replica saw."""

    replica: str
    run_ids: set[str] = field(default_factory=set)
    steps: list[tuple[float, int]] = field(default_factory=list)
    """(arrival monotonic time, status step)."""
    views: int = 0

    def __repr__(self) -> str:
        steps = [s for _, s in self.steps]
        return (f"Viewer({self.replica}: runs {sorted(self.run_ids)}, {len(steps)} statuses, "
                f"steps {steps[:3]}..{steps[-3:]}, {self.views} views)")

    def live(self, min_distinct: int) -> bool:
        return len({s for _, s in self.steps}) >= min_distinct and self.views >= 1


async def watch(viewer: Viewer, target: str, run_id: str, until: asyncio.Event,
                min_distinct: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stream = spb_grpc.StreamerServiceStub(channel).Subscribe(
            spb.SubscribeRequest(run_id=run_id, views=["boundary"], max_fps=5), wait_for_ready=True
        )
        try:
            async for frame in stream:
                body = frame.WhichOneof("body")
                if body == "status":
                    viewer.run_ids.add(frame.status.run_id)
                    viewer.steps.append((time.monotonic(), frame.status.step))
                elif body == "view":
                    viewer.views += 1
                if viewer.live(min_distinct) or until.is_set():
                    return
        finally:
            stream.cancel()


async def test_viewers_of_either_streamer_replica_see_the_same_run_live(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    async with (
        running("streamer", ports[0], ["--metrics-port", "-1"], tmp_path, suffix="-a") as sa,
        running("streamer", ports[1], ["--metrics-port", "-1"], tmp_path, suffix="-b") as sb,
        running(
            "trainer", free_port(),
            ["--metrics-port", "-1", "--streamer-target", f"{sa.target},{sb.target}",
             "--inference-target", "", "--model-repository", str(tmp_path / "models"),
             "--demo-task", "", "--checkpoint-every-s", "0"],
            tmp_path,
        ) as trainer,
    ):
        async with grpc.aio.insecure_channel(trainer.target) as channel:
            stub = tpb_grpc.TrainerServiceStub(channel)
            started = await stub.StartRun(tpb.StartRunRequest(task="spiral", seed=3), timeout=30)
            run_id = started.run.run_id
            assert run_id

            viewers = [Viewer("a"), Viewer("b")]
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(watch(v, s.target, run_id, stop, min_distinct=4))
                for v, s in zip(viewers, (sa, sb))
            ]
            try:
                done, pending = await asyncio.wait(tasks, timeout=90)
            finally:
                stop.set()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for t in done:
                t.result()  # a failed subscription fails the test with its error
            current = (await stub.GetRun(tpb.GetRunRequest(run_id=run_id), timeout=10)).run
            await stub.StopRun(tpb.StopRunRequest(run_id=run_id), timeout=10)

        logs = f"\n--- trainer\n{trainer.log_tail()}\n--- a\n{sa.log_tail()}\n--- b\n{sb.log_tail()}"
        assert not pending, f"a viewer saw no live run within 90 s: {viewers}{logs}"
        for v in viewers:
            assert v.run_ids == {run_id}, (v, logs)
            steps = [s for _, s in v.steps]
            assert steps == sorted(steps), f"replica {v.replica}: steps went back: {steps}"
            assert v.live(4), (v, logs)
        # Live on both at once: their observation windows overlap, and each saw steps
        # produced after the other had already started watching.
        a, b = viewers
        assert a.steps[0][0] < b.steps[-1][0] and b.steps[0][0] < a.steps[-1][0]
        assert max(s for _, s in a.steps) > min(s for _, s in b.steps)
        assert max(s for _, s in b.steps) > min(s for _, s in a.steps)
        assert current.step >= max(max(s for _, s in v.steps) for v in viewers)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a /metrics endpoint, by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def infer_count(port: int) -> float:
    return sum(
        value for labels, value in scrape(port).get("tensorwire_rpc_handled_total", [])
        if labels.get("service") == "inference" and labels.get("method") == "ModelInfer"
        and labels.get("code") == "OK"
    )


async def test_two_inference_workers_share_the_load(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    torch.manual_seed(0)
    model = build_model("spiral").eval()
    modelrepo.write_version(repo, "spiral", "spiral", model.state_dict())
    metrics_ports = [free_port(), free_port()]
    args = ["--model-repository", str(repo), "--poll-interval-s", "0"]
    async with (
        running("inference", free_port(), [*args, "--metrics-port", str(metrics_ports[0])],
                tmp_path, suffix="-a") as ia,
        running("inference", free_port(), [*args, "--metrics-port", str(metrics_ports[1])],
                tmp_path, suffix="-b") as ib,
    ):
        for worker in (ia, ib):  # each loads the repository's models at start
            async with InferenceClient(worker.target) as one:
                deadline = time.monotonic() + 60
                while not await one.model_ready("spiral"):
                    assert time.monotonic() < deadline, f"spiral never ready:\n{worker.log_tail()}"
                    await asyncio.sleep(0.1)
        before = [infer_count(p) for p in metrics_ports]

        requests, concurrency = 240, 16
        rng = np.random.default_rng(1)
        points = [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(requests)]
        # One client, one endpoint list: what `dns:///inference-headless:8001` resolves to.
        async with InferenceClient(f"{ia.target},{ib.target}") as client:
            gate = asyncio.Semaphore(concurrency)

            async def call(x: np.ndarray) -> np.ndarray:
                async with gate:
                    return (await client.infer("spiral", {"points": x}, timeout_s=30))["logits"]

            answers = await asyncio.gather(*(call(x) for x in points))
            # The pool opened one channel per address at the first call.
            assert len(client.pool.addresses) == 2 and client.pool.size == 2, repr(client.pool)
            pool_repr = repr(client.pool)

        with torch.no_grad():
            for x, got in zip(points, answers):
                np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
        served = [infer_count(p) - b for p, b in zip(metrics_ports, before)]
        print(f"ModelInfer answered per worker: {served} of {requests} ({concurrency} concurrent)")
        assert sum(served) == requests, served
        assert min(served) >= 0.2 * requests, f"one worker took (almost) everything: {served}; {pool_repr}"
