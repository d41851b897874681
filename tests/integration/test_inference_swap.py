"""Hot swap under continuous load, and the weighted traffic split (A/B, roll-out).

Real server on port 0, real gRPC clients, real torch models; waits are polls
with deadlines on observable state, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from services.inference.app import create_app
from services.inference.settings import InferenceSettings
from tensorwire.data import oip
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tests.conftest import serving, settings_for
from tests.support.waiting import until

pytestmark = pytest.mark.usefixtures("inference_frontend")  # both frontends: python, native


def spiral_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("spiral").state_dict()


def spiral_request(x: np.ndarray, version: str = "") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="spiral",
        model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="points", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )


def expected(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    model = build_model("spiral")
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


async def test_hot_swap_under_load_drops_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    states = {1: spiral_state(1), 2: spiral_state(2)}
    modelrepo.write_version(repo, "spiral", "spiral", states[1])
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.02)
    app = await create_app(settings)
    x = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    want = {v: expected(s, x) for v, s in states.items()}
    seen: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    wrong: list[str] = []
    regressions: list[str] = []
    stop = asyncio.Event()

    async with serving(app, "inference") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def client(i: int) -> None:
                newest = 0
                while not stop.is_set():
                    try:
                        reply = await stub.ModelInfer(spiral_request(x), timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{exc.code()}: {exc.details()}")
                        continue
                    version = int(reply.model_version)
                    seen[reply.model_version] += 1
                    if version < newest:
                        regressions.append(f"client {i} went back from v{newest} to v{version}")
                    newest = max(newest, version)
                    got = oip.decode_outputs(reply)["logits"]
                    if not np.allclose(got, want[version], rtol=1e-5, atol=1e-6):
                        wrong.append(f"v{version} answered other weights")

            clients = [asyncio.create_task(client(i)) for i in range(8)]
            await until(lambda: seen["1"] >= 200, what="load on version 1")
            modelrepo.write_version(repo, "spiral", "spiral", states[2])  # a trainer checkpoint
            await until(lambda: seen["2"] >= 200, what="traffic on version 2")
            stop.set()
            await asyncio.gather(*clients)
            await app.repository.wait_retired()
            assert app.repository.versions("spiral") == [2]

    assert errors == []
    assert wrong == []
    assert regressions == []
    assert seen["1"] >= 200 and seen["2"] >= 200
    assert app.repository.swaps == 2  # the initial load and the swap


async def test_traffic_split_and_runtime_rollout(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    for seed in (1, 2):
        modelrepo.write_version(
            repo, "spiral", "spiral", spiral_state(seed),
            config_overrides={"version_policy": {"all": {}}, "traffic": {"1": 80, "2": 20}},
        )
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.02)
    app = await create_app(settings)
    x = np.zeros((1, 2), dtype=np.float32)
    async with serving(app, "inference") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def counts(n: int) -> collections.Counter[str]:
                seen: collections.Counter[str] = collections.Counter()

                async def one(_: int) -> None:
                    seen[(await stub.ModelInfer(spiral_request(x), timeout=10)).model_version] += 1

                for start in range(0, n, 50):
                    await asyncio.gather(*(one(i) for i in range(start, min(n, start + 50))))
                return seen

            n = 1500
            split = await counts(n)
            # Binomial sd at p=0.2, n=1500 is 1.0 %; 5 points is a 5-sigma tolerance.
            assert abs(split["2"] / n - 0.20) < 0.05, split
            assert split["1"] + split["2"] == n

            # An explicit version bypasses the split.
            reply = await stub.ModelInfer(spiral_request(x, version="2"), timeout=10)
            assert reply.model_version == "2"

            # Gradual roll-out step at run time through the standard RPC (Triton's config override).
            override = json.dumps({"traffic": {"1": 50, "2": 50}})
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(
                model_name="spiral", parameters={"config": pb.ModelRepositoryParameter(string_param=override)},
            ), timeout=30)
            split = await counts(n)
            assert abs(split["2"] / n - 0.50) < 0.07, split

            # ... and by editing config.json (what an operator or the trainer does): all on v2.
            config = modelrepo.read_config(repo, "spiral")
            config["traffic"] = {"1": 0, "2": 1}
            modelrepo.write_config(repo, "spiral", config)

            async def all_on_two() -> bool:
                return (await counts(20)) == {"2": 20}

            deadline = time.monotonic() + 30
            while not await all_on_two():
                assert time.monotonic() < deadline, "config.json traffic change never applied"
            # No reload happened for a traffic-only change: still both versions loaded.
            assert app.repository.versions("spiral") == [1, 2]


@pytest.mark.parametrize("policy, versions", [
    ({"latest": {"num_versions": 2}}, [2, 3]),
    ({"specific": {"versions": [1, 3]}}, [1, 3]),
    ({"all": {}}, [1, 2, 3]),
])
async def test_version_policies(tmp_path: Path, policy: dict, versions: list[int]) -> None:
    repo = tmp_path / "models"
    for seed in (1, 2, 3):
        modelrepo.write_version(repo, "spiral", "spiral", spiral_state(seed),
                                config_overrides={"version_policy": policy})
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    app = await create_app(settings)
    try:
        assert app.repository.versions("spiral") == versions
        assert app.repository.model_ready("spiral", str(versions[0]))
        missing = ({1, 2, 3} - set(versions))
        for v in missing:
            assert not app.repository.model_ready("spiral", str(v))
    finally:
        await app.aclose()


async def test_broken_version_keeps_old_serving_and_is_reported(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    modelrepo.write_version(repo, "spiral", "spiral", spiral_state(1))
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    app = await create_app(settings)
    try:
        # A checkpoint whose tensors do not fit the model (as from a different architecture).
        modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral", hidden=4).state_dict())
        await app.repository.scan()
        assert app.repository.versions("spiral") == [1]  # the old version still serves
        (entry,) = [e for e in app.repository.index() if e.name == "spiral"]
        assert entry.state == "READY" and entry.version == "1"
        assert "version 2" in app.repository.load_errors["spiral"]
        assert "weights do not fit" in app.repository.load_errors["spiral"]
        loads = app.repository.loader.metrics.loads
        await app.repository.scan()  # unchanged files: not retried on every poll
        assert app.repository.loader.metrics.loads == loads
    finally:
        await app.aclose()


async def test_prometheus_metrics_of_batcher_and_loader(tmp_path: Path) -> None:
    import urllib.request

    repo = tmp_path / "models"
    modelrepo.write_version(repo, "spiral", "spiral", spiral_state(1))
    app = await create_app(settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0))
    x = np.zeros((2, 2), np.float32)
    async with serving(app, "inference") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await asyncio.gather(*(stub.ModelInfer(spiral_request(x), timeout=10) for _ in range(20)))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line.startswith("tensorwire_inference")}
    key = '{model="spiral",version="1"}'
    assert lines[f"tensorwire_inference_batched_requests_total{key}"] == 20
    batches = lines[f"tensorwire_inference_batches_total{key}"]
    assert 1 <= batches <= 20
    # Batch size is a histogram: its mean is still requests per batch.
    assert lines[f"tensorwire_inference_batch_size_count{key}"] == batches
    assert lines[f"tensorwire_inference_batch_size_sum{key}"] == 20
    assert lines[f"tensorwire_inference_queue_wait_seconds_count{key}"] == 20
    assert lines['tensorwire_inference_model_loads_total{outcome="success"}'] >= 1


async def test_proxied_calls_and_batches_through_repeated_swaps(tmp_path: Path) -> None:
    """Calls the native frontend forwards to Python (metadata; batches a swap made
    stale) while versions keep coming: each must be answered and the process must
    live (it once aborted here: a forwarded call's context freed under gRPC)."""
    repo = tmp_path / "models"
    modelrepo.write_version(repo, "spiral", "spiral", spiral_state(1))
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.02)
    app = await create_app(settings)
    x = np.random.default_rng(0).standard_normal((1, 2)).astype(np.float32)
    errors: list[str] = []
    answered = collections.Counter[str]()
    stop = asyncio.Event()
    async with serving(app, "inference") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def client() -> None:
                while not stop.is_set():
                    try:
                        await stub.ModelMetadata(pb.ModelMetadataRequest(name="spiral"), timeout=10)
                        answered["metadata"] += 1
                        await stub.ModelInfer(spiral_request(x), timeout=10)
                        answered["infer"] += 1
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{exc.code()}: {exc.details()}")

            clients = [asyncio.create_task(client()) for _ in range(16)]
            for version in range(2, 32):
                await asyncio.sleep(0.1)
                modelrepo.write_version(repo, "spiral", "spiral", spiral_state(version))
            await until(lambda: app.repository.versions("spiral") == [31], what="the last version")
            await asyncio.sleep(0.25)
            stop.set()
            await asyncio.gather(*clients)
    assert errors == []
    assert answered["metadata"] >= 100 and answered["infer"] >= 100, answered


async def test_hot_swaps_mid_stream_drop_nothing(tmp_path: Path) -> None:
    """Streams with many messages in flight while versions keep coming: every message is
    answered, none with an error, each by the weights of the version it names (on the
    native frontend, batches a swap made stale go to Python mid-stream)."""
    repo = tmp_path / "models"
    states = {v: spiral_state(v) for v in range(1, 9)}
    modelrepo.write_version(repo, "spiral", "spiral", states[1])
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.02)
    app = await create_app(settings)
    x = np.random.default_rng(0).standard_normal((2, 2)).astype(np.float32)
    want = {v: expected(s, x) for v, s in states.items()}
    problems: list[str] = []
    answered = collections.Counter[str]()
    stop = asyncio.Event()
    async with serving(app, "inference") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def client(c: int) -> None:
                while not stop.is_set():
                    sent = [f"{c}-{i}" for i in range(64)]

                    async def send() -> AsyncIterator[pb.ModelInferRequest]:
                        for rid in sent:
                            r = spiral_request(x)
                            r.id = rid
                            yield r

                    ids = []
                    async for reply in stub.ModelStreamInfer(send(), timeout=30):
                        ids.append(reply.infer_response.id)
                        if reply.error_message:
                            problems.append(reply.error_message)
                            continue
                        version = int(reply.infer_response.model_version)
                        answered[str(version)] += 1
                        got = oip.decode_outputs(reply.infer_response)["logits"]
                        if not np.allclose(got, want[version], rtol=1e-5, atol=1e-6):
                            problems.append(f"v{version} answered other weights")
                    if sorted(ids) != sorted(sent):
                        problems.append(f"stream {c}: {len(ids)} answers for {len(sent)} messages")

            clients = [asyncio.create_task(client(c)) for c in range(4)]
            for version in range(2, 9):
                await asyncio.sleep(0.15)
                modelrepo.write_version(repo, "spiral", "spiral", states[version])
            await until(lambda: app.repository.versions("spiral") == [8], what="the last version")
            await until(lambda: answered["8"] >= 64, what="traffic on the last version")
            stop.set()
            await asyncio.gather(*clients)
    assert problems == []
    assert sum(answered.values()) >= 500, answered
    if app.frontend is not None:
        assert app.frontend.stats()["streams"] >= 4
