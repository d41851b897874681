"""Lazy models: the trainer's ``run-<id>`` checkpoints load on their first request.

A real inference server on port 0 over a repository holding ``spiral`` and many
``run-<id>`` models, real gRPC (and HTTP) clients, real torch models: none of the run
models loads at boot nor is polled; the first request naming one loads it and is
answered with what torch computes; RepositoryModelLoad/Unload keep their meaning.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
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

RUNS = 40


def spiral_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("spiral").state_dict()


def expected(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    model = build_model("spiral")
    model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def infer_request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="points", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )


def run_name(i: int) -> str:
    return f"run-{i:012x}"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    modelrepo.write_version(root, "spiral", "spiral", spiral_state(0))
    for i in range(RUNS):
        modelrepo.write_version(root, run_name(i), "spiral", spiral_state(100 + i))
    return root


def states(index: pb.RepositoryIndexResponse) -> dict[str, tuple[str, str, str]]:
    return {m.name: (m.version, m.state, m.reason) for m in index.models}


@pytest.mark.usefixtures("inference_frontend")
async def test_boot_loads_no_run_model_and_the_first_infer_loads_one(repo: Path, tmp_path: Path) -> None:
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.05)
    app = await create_app(settings)
    async with serving(app, "inference") as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        index = states(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert index["spiral"] == ("1", "READY", "")
        assert len(index) == RUNS + 1
        for i in range(RUNS):  # listed, not loaded
            assert index[run_name(i)] == ("", "UNAVAILABLE", "not loaded; loads on its first request")
        assert [m.name for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models] == [
            "spiral"]
        assert [m for m, _, _ in app.repository.batchers()] == ["spiral"]
        loads_at_boot = app.repository.loader.metrics.loads
        assert loads_at_boot == 1

        # Polls (every 50 ms) leave them alone: none loads, none is even looked at.
        await asyncio.sleep(0.3)
        assert app.repository.loader.metrics.loads == 1

        # The first request of one, many at once: one load, all answered with its weights.
        x = np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32)
        target = run_name(7)
        replies = await asyncio.gather(*(stub.ModelInfer(infer_request(target, x)) for _ in range(8)))
        want = expected(spiral_state(107), x)
        for reply in replies:
            assert reply.model_name == target and reply.model_version == "1"
            np.testing.assert_allclose(oip.decode_outputs(reply)["logits"], want, rtol=1e-5, atol=1e-6)
        assert app.repository.loader.metrics.loads == 2
        index = states(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert index[target] == ("1", "READY", "")
        assert sum(state == "READY" for _, state, _ in index.values()) == 2

        # Once loaded it is polled like any other model: a new checkpoint is served.
        modelrepo.write_version(repo, target, "spiral", spiral_state(200))

        async def new_version_serves() -> bool:
            reply = await stub.ModelInfer(infer_request(target, x))
            return reply.model_version == "2"

        await until(new_version_serves, what="the poll to load version 2 of the loaded run model")
        np.testing.assert_allclose(
            oip.decode_outputs(await stub.ModelInfer(infer_request(target, x)))["logits"],
            expected(spiral_state(200), x), rtol=1e-5, atol=1e-6)
        # ...while a new version of an unloaded one is not.
        modelrepo.write_version(repo, run_name(8), "spiral", spiral_state(201))
        await asyncio.sleep(0.3)
        assert states(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))[run_name(8)][1] == "UNAVAILABLE"
        assert app.repository.loader.metrics.loads == 3  # spiral, run 7 v1, run 7 v2

        # The trainer deletes the run (DeleteRun, --keep-runs): the next polls unload it.
        assert modelrepo.delete_model(repo, target)

        async def gone() -> bool:
            return target not in states(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))

        await until(gone, what="the poll to unload the deleted run model")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(infer_request(target, x))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert [m for m, _, _ in app.repository.batchers()] == ["spiral"]
        await app.repository.wait_retired()


async def test_metadata_ready_and_config_load_and_the_other_rpcs_keep_their_meaning(
        repo: Path, tmp_path: Path) -> None:
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    app = await create_app(settings)
    async with serving(app, "inference") as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)

        # Statistics load nothing: a clear status until the model is loaded.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelStatistics(pb.ModelStatisticsRequest(name=run_name(1)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "is not loaded; its first request" in (err.value.details() or "")

        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=run_name(1)))
        assert meta.name == run_name(1) and list(meta.versions) == ["1"]
        assert [t.name for t in meta.inputs] == ["points"]
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=run_name(2)))).ready
        config = await stub.ModelConfig(pb.ModelConfigRequest(name=run_name(3)))
        assert config.config.name == run_name(3) and config.config.max_batch_size > 0
        stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=run_name(1)))
        assert [s.name for s in stats.model_stats] == [run_name(1)]
        ready = {m.name for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models}
        assert ready == {"spiral", run_name(1), run_name(2), run_name(3)}

        # A run model that is not on disk, or a bad name: NOT_FOUND / INVALID_ARGUMENT, nothing loads.
        loads = app.repository.loader.metrics.loads
        for name, code in ((run_name(RUNS + 5), grpc.StatusCode.NOT_FOUND),
                           ("run-../models/spiral", grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfer(infer_request(name, np.zeros((1, 2), np.float32)))
            assert err.value.code() == code, err.value.details()
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name=name))).ready
        assert app.repository.loader.metrics.loads == loads

        # An explicit unload holds: a request does not bring it back, RepositoryModelLoad does.
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=run_name(1)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(infer_request(run_name(1), np.zeros((1, 2), np.float32)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "unloaded" in (err.value.details() or "")
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name=run_name(1)))).ready
        assert states(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))[run_name(1)] == (
            "", "UNAVAILABLE", "unloaded")
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=run_name(1)))
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=run_name(1)))).ready

        # An explicit load of one never requested (what the trainer sends after a checkpoint).
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=run_name(4)))
        assert states(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))[run_name(4)] == ("1", "READY", "")


async def test_a_broken_run_model_fails_its_requests_with_the_reason_and_is_not_retried(
        repo: Path, tmp_path: Path) -> None:
    broken = run_name(5)
    # Weights that do not fit the config (16 hidden units on disk, 24 in the config).
    modelrepo.write_config(repo, broken, modelrepo.default_config(broken, "spiral", {"hidden": 24}))
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.05)
    app = await create_app(settings)
    async with serving(app, "inference") as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        await asyncio.sleep(0.2)  # polls: a lazy model is not looked at, so no failure is recorded
        assert states(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))[broken] == (
            "", "UNAVAILABLE", "not loaded; loads on its first request")
        loads = app.repository.loader.metrics.loads
        for _ in range(3):  # one load tried; the same files are not tried again
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfer(infer_request(broken, np.zeros((1, 2), np.float32)))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"model {broken!r} failed to load" in (err.value.details() or ""), err.value.details()
            assert "size mismatch" in (err.value.details() or ""), err.value.details()
            assert app.repository.loader.metrics.loads == loads + 1
        _, state, reason = states(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))[broken]
        assert state == "UNAVAILABLE" and "size mismatch" in reason
        # Fixed on disk: its next request loads it.
        modelrepo.write_config(repo, broken, modelrepo.default_config(broken, "spiral"))
        x = np.ones((2, 2), np.float32)
        reply = await stub.ModelInfer(infer_request(broken, x))
        np.testing.assert_allclose(oip.decode_outputs(reply)["logits"], expected(spiral_state(105), x),
                                   rtol=1e-5, atol=1e-6)


async def test_http_requests_load_run_models_too(repo: Path, tmp_path: Path) -> None:
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    app = await create_app(settings)
    async with serving(app, "inference"), httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
        index = (await http.post("/v2/repository/index", json={})).json()
        assert {m["name"]: m["state"] for m in index}[run_name(9)] == "UNAVAILABLE"
        meta = await http.get(f"/v2/models/{run_name(9)}")
        assert meta.status_code == 200 and meta.json()["versions"] == ["1"]
        assert (await http.get(f"/v2/models/{run_name(10)}/ready")).status_code == 200
        x = [[0.5, -0.25]]
        reply = await http.post(f"/v2/models/{run_name(11)}/infer", json={
            "inputs": [{"name": "points", "datatype": "FP32", "shape": [1, 2], "data": x}]})
        assert reply.status_code == 200, reply.text
        got = np.array(reply.json()["outputs"][0]["data"], np.float32).reshape(1, 2)
        np.testing.assert_allclose(got, expected(spiral_state(111), np.array(x, np.float32)), rtol=1e-5, atol=1e-6)
        ready = {m["name"] for m in (await http.post("/v2/repository/index", json={"ready": True})).json()}
        assert ready == {"spiral", run_name(9), run_name(10), run_name(11)}


async def test_lazy_models_setting_empty_loads_everything_at_boot(repo: Path, tmp_path: Path) -> None:
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0,
                            lazy_models="")
    app = await create_app(settings)
    try:
        assert len(app.repository.batchers()) == RUNS + 1
    finally:
        await app.aclose()


async def test_a_request_during_the_boot_scan_waits_for_it(tmp_path: Path) -> None:
    """The servers listen before the boot scan ends (health says NOT_SERVING meanwhile).
    A request for a model on disk that the scan has not reached yet waits for the scan
    and is answered; it used to get NOT_FOUND "unknown model" (seen by two workers
    sharing a port, one still scanning). A name not on disk is still NOT_FOUND."""
    from services.inference.records import InferRequest
    from services.inference.repository import ModelRepository, RepositoryOptions
    from tensorwire.data.tensors import Tensor
    from tensorwire.errors import NotFoundError, UnavailableError

    root = tmp_path / "models"
    state = spiral_state(5)
    modelrepo.write_version(root, "spiral", "spiral", state)
    repository = ModelRepository(root, RepositoryOptions(poll_interval_s=0))
    await repository.start(wait=False)  # returns before the scan task has run at all
    try:
        assert not repository.ready
        with pytest.raises(UnavailableError, match="is loading: the repository's boot scan is running"):
            repository.version_of("spiral", "")  # asked without waiting: retry, not "unknown"
        x = np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32)
        result = await asyncio.wait_for(repository.infer(InferRequest("spiral", "", "r", [Tensor("points", "FP32", x)])),
                                        timeout=60)
        assert repository.ready
        np.testing.assert_allclose(result.outputs[0].array, expected(state, x), rtol=1e-5, atol=1e-6)
        with pytest.raises(NotFoundError, match="unknown model"):
            await repository.infer(InferRequest("absent", "", "r", [Tensor("points", "FP32", x)]))
    finally:
        await repository.aclose()
