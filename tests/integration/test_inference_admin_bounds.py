"""Issue 12's attacks on inference's admin inputs and its loader, each a regression
test named after what it stops. Real servers (gRPC and HTTP on port 0), real torch
models, real uploads over ModelTransferService.
"""

from __future__ import annotations

import asyncio
import errno
import json
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.inference.app import create_app
from services.inference.settings import InferenceSettings
from tensorwire.checkpoints.upload import upload_checkpoint
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc
from tensorwire.serving import admission, modelrepo
from tensorwire.serving.models import build_model
from tensorwire.transfer.v1 import transfer_pb2 as tpb
from tensorwire.transfer.v1 import transfer_pb2_grpc as tpb_grpc
from tests.conftest import serving, settings_for

Input = pb.ModelInferRequest.InferInputTensor


def infer_request(version: str = "") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="spiral", model_version=version,
        inputs=[Input(name="points", datatype="FP32", shape=[2, 2])],
        raw_input_contents=[np.ones((2, 2), np.float32).tobytes()],
    )


class Suite:
    """One inference server on a repository holding ``spiral`` version 1."""

    def __init__(self, repo: Path, app: Any, channel: grpc.aio.Channel, http: httpx.AsyncClient) -> None:
        self.repo, self.app, self.channel, self.http = repo, app, channel, http
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)

    async def load(self, override: Any) -> grpc.aio.AioRpcError | None:
        text = override if isinstance(override, str) else json.dumps(override)
        try:
            await self.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(
                model_name="spiral", parameters={"config": pb.ModelRepositoryParameter(string_param=text)},
            ), timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    async def still_serves(self) -> None:
        reply = await self.stub.ModelInfer(infer_request(), timeout=10)
        assert reply.model_version == "1"
        assert (await self.stub.ServerReady(pb.ServerReadyRequest())).ready

    def config(self) -> dict[str, Any]:
        return json.loads((self.repo / "spiral" / modelrepo.CONFIG_FILE).read_text())


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    repo = tmp_path / "models"
    torch.manual_seed(3)
    modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral").state_dict())
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    app = await create_app(settings)
    async with serving(app, "inference") as server, grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}"
    ) as channel, httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
        yield Suite(repo, app, channel, http)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def test_override_with_a_billion_hidden_units_is_refused_before_building(suite: Suite) -> None:
    before_config, before_rss = suite.config(), _rss_mb()
    error = await suite.load({"model_args": {"hidden": 1_000_000_000}})
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "outside 1..1048576, the bound on any 'hidden' model_arg" in error.details(), error.details()
    # Under the bound on one arg, over the bound on the model: 4 TB of parameters, counted
    # on torch's meta device.
    error = await suite.load({"model_args": {"hidden": 1_000_000}})
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "MiB" in error.details() and "--max-model-mb" in error.details(), error.details()
    # JSON's 1e9 is a float: not a width at all.
    error = await suite.load({"model_args": {"hidden": 1e9}})
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be an integer" in error.details()
    # The same over HTTP (the same core).
    reply = await suite.http.post("/v2/repository/models/spiral/load", json={
        "parameters": {"config": {"model_args": {"hidden": 1_000_000}}}})
    assert reply.status_code == 429 and "--max-model-mb" in reply.json()["error"], reply.text
    assert _rss_mb() - before_rss < 200  # nothing of 4 exabytes was allocated
    assert suite.config() == before_config
    await suite.still_serves()


async def test_kind_change_is_refused_and_never_persisted(suite: Suite, tmp_path: Path) -> None:
    error = await suite.load({"kind": "trajectory"})
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot change kind" in error.details(), error.details()
    assert suite.config()["kind"] == "spiral"
    # The trainer's next checkpoint still installs (it broke every one before).
    version = modelrepo.write_version(suite.repo, "spiral", "spiral", build_model("spiral").state_dict())
    assert version == 2
    for bad in ({"name": "other"}, {"inputs": []}, {"platform": "onnxruntime_onnx"}):
        error = await suite.load(bad)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    await suite.still_serves()


async def test_nan_and_negative_traffic_weights_are_refused(suite: Suite) -> None:
    for traffic, fragment in (
        ('{"traffic": {"1": NaN}}', "finite number >= 0, got nan"),
        ('{"traffic": {"1": Infinity}}', "finite number >= 0, got inf"),
        ({"traffic": {"1": -1}}, "finite number >= 0, got -1"),
        ({"traffic": {"1": True}}, "finite number"),
        ({"traffic": {"7": 1}}, "version 7, which is not on disk (versions: 1)"),
        ({"traffic": {"²": 1}}, "ASCII digits"),
    ):
        error = await suite.load(traffic)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, traffic
        assert fragment in error.details(), (traffic, error.details())
        # Every later ModelInfer still answers (a NaN split made them all INTERNAL).
        await suite.still_serves()
    reply = await suite.http.post("/v2/repository/models/spiral/load",
                                  content=b'{"parameters": {"config": "{\\"traffic\\": {\\"1\\": NaN}}"}}')
    assert reply.status_code == 400 and "finite" in reply.json()["error"], reply.text
    assert suite.config()["traffic"] == {}


async def test_override_is_persisted_only_after_the_load_succeeds(suite: Suite) -> None:
    # hidden=32 does not fit version 1's weights: the load fails, nothing is written.
    before = suite.config()
    error = await suite.load({"model_args": {"hidden": 32}})
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "was not changed" in error.details() and "weights do not fit" in error.details()
    assert suite.config() == before
    await suite.still_serves()
    # A later plain load still uses the config on disk (the failed override was dropped).
    assert await suite.load({}) is None
    await suite.still_serves()
    # One that loads is written once it serves.
    assert await suite.load({"max_batch_size": 4, "traffic": {"1": 1}}) is None
    assert suite.config()["max_batch_size"] == 4 and suite.config()["traffic"] == {"1": 1}
    config = await suite.stub.ModelConfig(pb.ModelConfigRequest(name="spiral"), timeout=10)
    assert config.config.max_batch_size == 4


async def test_unknown_and_out_of_range_override_keys_are_refused(suite: Suite) -> None:
    for bad, fragment in (
        ({"max_batch_size": 10**9}, "max_batch_size must be an integer in 0..65536"),
        ({"instance_count": 10_000}, "instance_count must be an integer in 1..64"),
        ({"model_args": {"layers": 100_000}}, "model_args.layers = 100000 is outside 1..256"),
        ({"model_args": {"nope": 1}}, "unknown model_arg 'nope'"),
        ({"model_args": [1, 2]}, "model_args must be a JSON object"),
        ({"evil": 1}, "config override key 'evil' is not allowed"),
        ("[1, 2]", "must be a JSON object"),
    ):
        error = await suite.load(bad)
        assert error is not None and error.code() in (
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), bad
        assert fragment in error.details(), (bad, error.details())
    await suite.still_serves()


async def test_unicode_digit_versions_are_invalid_argument_not_internal_or_one(suite: Suite) -> None:
    for version in ("²", "١", "1\n", "+1", " 1", "0", str(2**31), "9" * 500):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.stub.ModelInfer(infer_request(version), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (version, info.value.details())
        assert len(info.value.details()) < 300
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.stub.ModelMetadata(pb.ModelMetadataRequest(name="spiral", version=version), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, version
    reply = await suite.http.post("/v2/models/spiral/versions/%C2%B2/infer", json={"inputs": []})
    assert reply.status_code == 400 and "ASCII digits" in reply.json()["error"], reply.text
    # A version folder with a Unicode digit name is not a version (a scan once raised on it).
    (suite.repo / "spiral" / "²").mkdir()
    (suite.repo / "spiral" / "²" / "model.pt").write_bytes(b"x")
    assert modelrepo.list_versions(suite.repo, "spiral") == [1]
    assert await suite.load({}) is None
    await suite.still_serves()


async def test_model_name_with_a_trailing_newline_is_invalid(suite: Suite) -> None:
    for name in ("spiral\n", "spiral\n\n", "x" * 129):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await suite.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(name)
        assert "is not valid" in info.value.details()


async def test_error_messages_cut_echoed_input_to_200_chars(suite: Suite) -> None:
    long = "A" * 100_000
    for call in (
        suite.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=long), timeout=10),
        suite.stub.ModelInfer(pb.ModelInferRequest(model_name=long), timeout=10),
        suite.stub.ModelInfer(infer_request(long), timeout=10),
        suite.stub.ModelInfer(pb.ModelInferRequest(
            model_name="spiral", inputs=[Input(name=long, datatype="FP32", shape=[1, 2])],
            raw_input_contents=[b"\0" * 8]), timeout=10),
        suite.stub.ModelInfer(pb.ModelInferRequest(
            model_name="spiral", inputs=[Input(name="points", datatype=long, shape=[1, 2])],
            raw_input_contents=[b"\0" * 8]), timeout=10),
        suite.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(
            model_name="spiral", parameters={"config": pb.ModelRepositoryParameter(
                string_param=json.dumps({"traffic": {"1": long}}))}), timeout=10),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert len(info.value.details()) <= 200 + 200, len(info.value.details())
        assert "chars)" in info.value.details()
    reply = await suite.http.post("/v2/models/spiral/infer", json={
        "inputs": [{"name": long, "datatype": "FP32", "shape": [1, 2], "data": [0, 0]}]})
    assert reply.status_code == 400 and len(reply.json()["error"]) <= 400, reply.text[:500]


# ------------------------------------------------------------------- uploads


def _weights(tmp_path: Path, **model_args: int) -> Path:
    path = tmp_path / "ckpt.pt"
    torch.save(build_model("spiral", **model_args).state_dict(), path)
    return path


async def test_upload_of_version_2_pow_62_is_refused(suite: Suite, tmp_path: Path) -> None:
    path = _weights(tmp_path)
    for version, fragment in ((2**62, "must be in 1..2147483647"), (1 + 1 + admission.MAX_VERSION_STEP,
                                                                   "more than 1000 above the newest (1)")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upload_checkpoint(suite.channel, path, model="spiral", kind="spiral", version=version,
                                    timeout_s=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert fragment in info.value.details(), info.value.details()
    assert modelrepo.list_versions(suite.repo, "spiral") == [1]
    # The newest + N bound itself is allowed.
    result = await upload_checkpoint(suite.channel, path, model="spiral", kind="spiral",
                                     version=1 + admission.MAX_VERSION_STEP, timeout_s=30)
    assert result.version == 1001


async def test_upload_with_model_args_json_array_is_invalid_argument(suite: Suite, tmp_path: Path) -> None:
    stub = tpb_grpc.ModelTransferServiceStub(suite.channel)

    async def requests() -> AsyncIterator[tpb.UploadModelRequest]:
        yield tpb.UploadModelRequest(header=tpb.UploadHeader(
            model="fresh", kind="spiral", total_bytes=10, model_args_json="[1,2]"))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UploadModel(requests(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_args_json must be a JSON object" in info.value.details()


async def test_upload_of_a_new_model_with_huge_model_args_is_refused(suite: Suite, tmp_path: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upload_checkpoint(suite.channel, _weights(tmp_path), model="giant", kind="spiral",
                                model_args={"hidden": 1_000_000}, timeout_s=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert not (suite.repo / "giant").exists()


async def test_enospc_during_upload_is_resource_exhausted(
    suite: Suite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modelrepo, "install_weights_file", disk_full)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await upload_checkpoint(suite.channel, _weights(tmp_path), model="spiral", kind="spiral", timeout_s=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "out of space" in info.value.details()
    monkeypatch.undo()
    assert modelrepo.list_versions(suite.repo, "spiral") == [1]
    await suite.still_serves()


# ------------------------------------------------------------------- the loader at scale


async def test_300_models_all_load_and_readiness_waits_for_the_boot_scan(tmp_path: Path) -> None:
    """More than 256 models once left most UNAVAILABLE forever ("256 loads already
    queued") while the server said SERVING."""
    repo = tmp_path / "models"
    torch.manual_seed(0)
    state = build_model("spiral", hidden=2, layers=1).state_dict()
    count = 300
    for i in range(count):
        modelrepo.write_version(repo, f"m{i:03d}", "spiral", state, model_args={"hidden": 2, "layers": 1})
    # A broken one: weights that do not fit its config.
    modelrepo.write_version(repo, "broken", "spiral", build_model("spiral").state_dict())
    config = modelrepo.read_config(repo, "broken")
    config["model_args"] = {"hidden": 3}
    modelrepo.write_config(repo, "broken", config)

    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    start = time.perf_counter()
    app = await create_app(settings, wait_for_models=False)
    async with serving(app, "inference") as server, grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}"
    ) as channel, httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)).ready
        assert (await http.get("/v2/health/ready")).status_code == 400
        while (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)).status \
                != health_pb2.HealthCheckResponse.SERVING:
            assert time.perf_counter() - start < 300, app.repository.loader
            await asyncio.sleep(0.2)
        boot_s = time.perf_counter() - start
        assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)).ready
        assert (await http.get("/v2/health/ready")).status_code == 200
        index = (await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)).models
        states = {m.name: m for m in index}
        ready = [m for m in index if m.state == "READY"]
        assert len(ready) == count, [m for m in index if m.state != "READY"][:3]
        assert states["broken"].state == "UNAVAILABLE"
        assert "weights do not fit" in states["broken"].reason
        assert app.repository.loader.metrics.failures == 1  # a broken model is not retried
        reply = await stub.ModelInfer(pb.ModelInferRequest(
            model_name="m299", inputs=[Input(name="points", datatype="FP32", shape=[1, 2])],
            raw_input_contents=[np.ones((1, 2), np.float32).tobytes()]), timeout=10)
        assert reply.model_version == "1"
    print(f"\n{count} models booted in {boot_s:.1f}s")


async def test_transient_load_failures_are_retried_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose load hit a passing fault (an I/O error here, injected in front of
    the real backend) serves after the boot scan's retries; a broken one is not retried."""
    from services.inference import backends
    from services.inference.repository import ModelRepository, RepositoryOptions
    from tensorwire.calls.backoff import Backoff

    repo = tmp_path / "models"
    modelrepo.write_version(repo, "flaky", "spiral", build_model("spiral").state_dict())
    real_load, faults = backends.load, [0]

    def load(root: Path, name: str, *args: Any) -> Any:
        if faults[0] < 2:
            faults[0] += 1
            raise OSError(errno.EIO, "Input/output error")
        return real_load(root, name, *args)

    monkeypatch.setattr(backends, "load", load)
    repository = ModelRepository(repo, RepositoryOptions(
        poll_interval_s=0.0, retry_backoff=Backoff(initial_s=0.01, max_s=0.05)))
    try:
        await repository.start()
        assert faults[0] == 2 and repository.versions("flaky") == [1]
        assert [e.state for e in repository.index()] == ["READY"]
    finally:
        await repository.aclose()


async def test_load_that_times_out_is_cancelled_and_not_installed(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk (injected: reading the weights waits on a gate) makes the load run
    past its timeout; the load is cancelled at its next stage (no warm-up), nothing is
    installed or persisted, and the old version keeps serving."""
    import threading

    from services.inference import backends
    from tensorwire.serving.loader import LoaderConfig

    gate, reads = threading.Event(), []
    real_read = modelrepo.load_state_dict

    def slow_read(path: Path) -> dict[str, Any]:
        reads.append(path)
        assert gate.wait(30)
        return real_read(path)

    warm_ups = []
    real_warm_up = backends.warm_up
    monkeypatch.setattr(modelrepo, "load_state_dict", slow_read)
    monkeypatch.setattr(backends, "warm_up", lambda *a: (warm_ups.append(a), real_warm_up(*a)))
    loader = suite.app.repository.loader
    loader.config = LoaderConfig(load_timeout_s=0.3)
    error = await suite.load({"max_batch_size": 4})  # a new fingerprint: version 1 reloads
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert "was not changed" in error.details() and "load timeout of 0.3s" in error.details()
    assert reads and loader.abandoned == 1
    gate.set()
    deadline = time.monotonic() + 10
    while loader.abandoned:  # the cancelled thread stops at its next stage
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert warm_ups == []  # it stopped before warming up a model nobody will use
    assert loader.loaded() == []
    assert suite.config()["max_batch_size"] == 64  # not persisted
    config = await suite.stub.ModelConfig(pb.ModelConfigRequest(name="spiral"), timeout=10)
    assert config.config.max_batch_size == 64  # the old version still serves, unchanged
    await suite.still_serves()
