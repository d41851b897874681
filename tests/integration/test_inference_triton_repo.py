"""A Triton model repository served by tensorwire: TorchScript, torch.export and ONNX models
made here with the real exporters, tritonclient.grpc and tritonclient.http (in a subprocess,
unchanged) against the real gRPC and HTTP ports, answers compared with torch.

Hostile repositories (corrupt and truncated files, contradicting shapes, bad pbtxt, bad
dims, a forward that raises, unsupported platforms and fields) leave each bad model
UNAVAILABLE with its reason while the good ones serve.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch

from services.inference.app import create_app
from services.inference.settings import InferenceSettings
from tensorwire.checkpoints.upload import upload_checkpoint
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import serving, settings_for
from tests.support import triton_models as tm

ROOT = Path(__file__).resolve().parents[2]
GOOD = ("ts", "ep", "ox")


class Raises(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:
            raise RuntimeError("this model always fails")
        return x


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"ts": tm.mlp(1), "ep": tm.mlp(2), "ox": tm.mlp(3)}


@pytest.fixture
def repo(tmp_path: Path, models: dict[str, torch.nn.Module]) -> Path:
    root = tmp_path / "models"
    tm.write_torchscript(root, "ts", models["ts"], config=tm.pbtxt(
        "ts", "pytorch_libtorch", input_name="INPUT__0", output_name="OUTPUT__0"))
    tm.write_export(root, "ep", models["ep"])  # no config.pbtxt: auto-complete
    tm.write_onnx(root, "ox", models["ox"], config=tm.pbtxt("ox", "", extra="""
backend: "onnxruntime"
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "owner" value: { string_value: "team-a" } }
response_cache { enable: true }
version_policy: { latest: { num_versions: 1 } }"""))
    return root


def _bad_models(root: Path) -> dict[str, str]:
    """Hostile models, each with a fragment its RepositoryIndex reason must contain."""
    m = tm.mlp(9)
    (root / "trt" / "1").mkdir(parents=True)
    (root / "trt" / "1" / "model.plan").write_bytes(b"\0" * 64)
    (root / "trt" / "config.pbtxt").write_text('platform: "tensorrt_plan"\nmax_batch_size: 8\n')
    (root / "py" / "1").mkdir(parents=True)
    (root / "py" / "1" / "model.py").write_text("raise SystemExit('never run')\n")
    (root / "py" / "config.pbtxt").write_text('backend: "python"\n')
    corrupt = tm.write_onnx(root, "corrupt", m)
    corrupt.write_bytes(b"this is not an onnx graph" * 10)
    truncated = tm.write_export(root, "truncated", m)
    truncated.write_bytes(truncated.read_bytes()[:300])
    ts_trunc = tm.write_torchscript(root, "ts-truncated", m, config=tm.pbtxt("ts-truncated", "pytorch_libtorch"))
    ts_trunc.write_bytes(ts_trunc.read_bytes()[:200])
    tm.write_onnx(root, "contradicts", m, config=tm.pbtxt("contradicts", "onnxruntime_onnx").replace(
        f"dims: [ {tm.FEATURES} ]", "dims: [ 5 ]"))
    tm.write_onnx(root, "syntax", m, config='name: "syntax"\nplatform: "onnxruntime_onnx"\ninput [ { name: x }')
    tm.write_onnx(root, "zero-dim", m, config=tm.pbtxt("zero-dim", "onnxruntime_onnx").replace(
        f"dims: [ {tm.FEATURES} ]", "dims: [ 0 ]"))
    tm.write_onnx(root, "neg-dim", m, config=tm.pbtxt("neg-dim", "onnxruntime_onnx").replace(
        f"dims: [ {tm.CLASSES} ]", "dims: [ -2 ]"))
    tm.write_onnx(root, "optimization", m, config=tm.pbtxt("optimization", "onnxruntime_onnx",
                                                           extra="optimization { priority: PRIORITY_MAX }"))
    raises = root / "raises" / "1"
    raises.mkdir(parents=True)
    torch.jit.save(torch.jit.script(Raises()), str(raises / "model.pt"))
    (root / "raises" / "config.pbtxt").write_text(tm.pbtxt("raises", "pytorch_libtorch"))
    return {
        "trt": "'tensorrt_plan' is not supported",
        "py": "'python' is not supported",
        "corrupt": "cannot read",
        "truncated": "cannot read",
        "ts-truncated": "cannot load model.pt as pytorch_libtorch",
        "contradicts": "input 'x' has shape [-1, 5] by the config (batch dim -1) but [-1, 4]",
        "syntax": "config.pbtxt:3:17",
        "zero-dim": "dim 0 in [0] is not valid",
        "neg-dim": "dim -2 in [-2] is not valid",
        "optimization": "field 'optimization' of Triton's ModelConfig is not supported",
        "raises": "this model always fails",
    }


def run_client(*args: str, timeout: float = 180) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.support.triton_client", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_tritonclient_grpc_and_http_get_what_torch_computes(
    repo: Path, tmp_path: Path, models: dict[str, torch.nn.Module]
) -> None:
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    app = await create_app(settings)
    async with serving(app, "inference") as server:
        out = str(tmp_path / "report")
        await asyncio.to_thread(run_client, "models", f"127.0.0.1:{server.port}",
                                f"127.0.0.1:{app.http_port}", out, *GOOD)
    report = json.loads(Path(out + ".json").read_text())
    arrays = dict(np.load(out + ".npz"))
    assert report["http_live"] and report["http_ready"]
    assert report["http_server_metadata"]["name"] == "tensorwire"
    for name in GOOD:
        want = tm.reference(models[name], arrays[f"{name}/in"])
        for path in ("grpc", "http_binary", "http_json"):
            np.testing.assert_allclose(arrays[f"{name}/{path}"], want, rtol=1e-5, atol=1e-6, err_msg=f"{name}/{path}")
        http_meta, grpc_meta = report[f"{name}/http_metadata"], report[f"{name}/grpc_metadata"]
        assert http_meta["platform"] == grpc_meta["platform"]
        assert http_meta["inputs"][0]["shape"] == [-1, tm.FEATURES]
        assert report[f"{name}/http_ready"] is True
        assert report[f"{name}/http_json_response"]["id"] == "json-1"
        stats = report[f"{name}/http_stats"]["model_stats"][0]
        assert stats["inference_count"] == 9  # 3 rows, three times
        error = report[f"{name}/bad_shape_error"]
        assert error is not None and error["status"] == "400"
        assert repr(http_meta["inputs"][0]["name"]) in error["message"], error
    assert report["ts/http_metadata"]["platform"] == "pytorch_libtorch"
    assert report["ep/http_metadata"]["platform"] == "torch_export"
    # Auto-complete: the ExportedProgram's signature gave the tensors and batching.
    assert report["ep/http_metadata"]["inputs"][0]["name"] == "input"
    assert report["ep/http_config"]["max_batch_size"] == 64
    ox = report["ox/http_config"]
    assert report["ox/http_metadata"]["platform"] == "onnxruntime_onnx"
    assert ox["instance_group"][0]["count"] == 2 and ox["response_cache"] == {"enable": True}
    assert ox["parameters"]["owner"] == {"string_value": "team-a"}
    assert ox["input"][0]["dims"] == [tm.FEATURES]
    assert report["ox/grpc_config"]["config"]["response_cache"] == {"enable": True}
    assert report["unknown_model_error"]["status"] == "404"
    assert report["ready_after_unload"] is False and report["ready_after_load"] is True


async def test_bad_models_are_unavailable_with_reasons_and_the_rest_serve(repo: Path, tmp_path: Path) -> None:
    expected = _bad_models(repo)
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    app = await create_app(settings)
    async with serving(app, "inference") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
            states = {m.name: (m.state, m.reason) for m in index.models}
            for name in GOOD:
                assert states[name][0] == "READY", states[name]
            for name, fragment in expected.items():
                state, reason = states[name]
                assert state == "UNAVAILABLE" and fragment in reason, (name, reason)
            # The bad ones answer UNAVAILABLE with the reason; the good ones still infer.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="corrupt"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            x = np.ones((2, tm.FEATURES), np.float32)
            request = pb.ModelInferRequest(model_name="ox", raw_input_contents=[x.tobytes()])
            request.inputs.add(name="x", datatype="FP32", shape=[2, tm.FEATURES])
            reply = await stub.ModelInfer(request)
            assert reply.outputs[0].shape == [2, tm.CLASSES]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            index = (await http.post("/v2/repository/index", json={})).json()
            assert {e["name"]: e["state"] for e in index}["syntax"] == "UNAVAILABLE"
            reply = await http.get("/v2/models/raises/ready")
            assert reply.status_code == 400


async def test_hot_swap_ab_split_and_upload_of_an_onnx_model(
    repo: Path, tmp_path: Path, models: dict[str, torch.nn.Module]
) -> None:
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    app = await create_app(settings)
    x = np.random.default_rng(3).standard_normal((4, tm.FEATURES)).astype(np.float32)
    async with serving(app, "inference") as server, httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{app.http_port}"
    ) as http:

        async def infer(version: str = "") -> tuple[str, np.ndarray]:
            path = f"/v2/models/ox{'/versions/' + version if version else ''}/infer"
            reply = await http.post(path, json={"inputs": [
                {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]})
            assert reply.status_code == 200, reply.text
            doc = reply.json()
            return doc["model_version"], np.array(doc["outputs"][0]["data"], np.float32).reshape(4, tm.CLASSES)

        # Upload version 2 (a different model) over transfer.v1.UploadModel, then load: hot swap.
        new = tm.mlp(42)
        staged = tm.write_onnx(tmp_path / "staging", "ox", new)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        result = await upload_checkpoint(channel, staged, model="ox", kind="onnxruntime_onnx")
        assert result.version == 2 and (repo / "ox" / "2" / "model.onnx").is_file()
        await app.repository.load_model("ox")
        version, y = await infer()
        assert version == "2"
        np.testing.assert_allclose(y, tm.reference(new, x), rtol=1e-5, atol=1e-6)
        # A/B: both versions, split by the traffic parameter given at load time.
        reply = await http.post("/v2/repository/models/ox/load", json={"parameters": {
            "config": json.dumps({"version_policy": {"all": {}}, "traffic": {"1": 1, "2": 1}})}})
        assert reply.status_code == 200, reply.text
        seen = {(await infer())[0] for _ in range(40)}
        assert seen == {"1", "2"}
        np.testing.assert_allclose((await infer("1"))[1], tm.reference(models["ox"], x), rtol=1e-5, atol=1e-6)
        # An upload that is not an ONNX graph is refused and installs nothing.
        junk = tmp_path / "junk.onnx"
        junk.write_bytes(b"not a graph" * 100)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload_checkpoint(channel, junk, model="ox", kind="onnxruntime_onnx")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot read" in err.value.details()
        await channel.close()
        assert sorted(p.name for p in (repo / "ox").iterdir() if p.name.isdigit()) == ["1", "2"]


async def test_reshape_variable_dims_and_instance_count(tmp_path: Path) -> None:
    """Clients send [B, 2, 2] where the ONNX graph takes [B, 4] (reshape); a -1 dim takes any
    size; instance_group count becomes batches running at once."""
    from services.inference.repository import InferRequest, ModelRepository, RepositoryOptions
    from tensorwire.data.tensors import Tensor
    from tensorwire.errors import InvalidArgumentError

    root = tmp_path / "models"
    model = tm.mlp(8)
    tm.write_onnx(root, "reshaped", model, config=tm.pbtxt("reshaped", "onnxruntime_onnx", extra=(
        "instance_group [ { count: 3 } ]")).replace(
        f"dims: [ {tm.FEATURES} ] }}", "dims: [ 2, 2 ] reshape: { shape: [ 4 ] } }"))

    class Mean(torch.nn.Module):  # any sequence length: [B, -1] -> [B, 1]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=1, keepdim=True)

    folder = root / "mean" / "1"
    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(Mean()), str(folder / "model.pt"))
    (root / "mean" / "config.pbtxt").write_text("""
platform: "pytorch_libtorch"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "m" data_type: TYPE_FP32 dims: [ 1 ] } ]
""")
    repository = ModelRepository(root, RepositoryOptions(poll_interval_s=0))
    await repository.start()
    try:
        assert {e.name: e.state for e in repository.index()} == {"reshaped": "READY", "mean": "READY"}
        x = np.random.default_rng(2).standard_normal((3, 2, 2)).astype(np.float32)
        result = await repository.infer(InferRequest("reshaped", "", "r", [Tensor("x", "FP32", x)]))
        np.testing.assert_allclose(result.outputs[0].array, tm.reference(model, x.reshape(3, 4)),
                                   rtol=1e-5, atol=1e-6)
        with pytest.raises(InvalidArgumentError, match="must have shape \\[B, 2, 2\\]"):
            await repository.infer(InferRequest("reshaped", "", "r", [Tensor("x", "FP32", x.reshape(3, 4))]))
        assert repository.version_of("reshaped", "1").batcher.config.max_concurrent_batches == 3
        for length in (1, 5, 17):
            seq = np.arange(2 * length, dtype=np.float32).reshape(2, length)
            result = await repository.infer(InferRequest("mean", "", "m", [Tensor("x", "FP32", seq)]))
            np.testing.assert_allclose(result.outputs[0].array, seq.mean(axis=1, keepdims=True), rtol=1e-6)
        info = repository.info("mean")
        assert info.inputs[0].dims == (-1,) and info.config["platform"] == "pytorch_libtorch"
    finally:
        await repository.aclose()
