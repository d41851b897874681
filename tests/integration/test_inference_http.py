"""The HTTP/REST v2 endpoint with hostile bodies: each gets the right status, an
``{"error": ...}`` body naming what is wrong, and the server keeps serving.

Runs the real server (gRPC and HTTP on port 0) on a built-in kind (spiral, config.json)
and an ONNX model, with httpx; the well-formed requests' answers are checked against torch.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from services.inference.app import create_app
from services.inference.settings import InferenceSettings
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tests.conftest import serving, settings_for
from tests.support import triton_models as tm


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, torch.nn.Module, torch.nn.Module]]:
    repo = tmp_path / "models"
    torch.manual_seed(5)
    spiral = build_model("spiral").eval()
    modelrepo.write_version(repo, "spiral", "spiral", spiral.state_dict())
    onnx_model = tm.mlp(4)
    tm.write_onnx(repo, "ox", onnx_model)
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0,
                            max_message_mb=1)
    app = await create_app(settings)
    async with serving(app, "inference"), httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{app.http_port}"
    ) as client:
        yield client, spiral, onnx_model


def _json_input(x: np.ndarray, name: str = "points", datatype: str = "FP32") -> dict:
    return {"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.ravel().tolist()}


async def _error(reply: httpx.Response, status: int, *fragments: str) -> None:
    assert reply.status_code == status, (reply.status_code, reply.text)
    message = reply.json()["error"]
    for fragment in fragments:
        assert fragment in message, message


async def test_json_and_binary_inference_on_a_builtin_kind(http) -> None:  # type: ignore[no-untyped-def]
    client, spiral, _ = http
    x = np.random.default_rng(1).standard_normal((5, 2)).astype(np.float32)
    with torch.no_grad():
        want = spiral(torch.from_numpy(x)).numpy()
    reply = await client.post("/v2/models/spiral/infer", json={"id": "a", "inputs": [_json_input(x)]})
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["id"] == "a" and doc["model_version"] == "1"
    out = doc["outputs"][0]
    assert out["name"] == "logits" and out["shape"] == [5, 2]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(5, 2), want, rtol=1e-5, atol=1e-6)
    # Nested JSON data is row-major too.
    nested = {"name": "points", "datatype": "FP32", "shape": [5, 2], "data": x.tolist()}
    reply = await client.post("/v2/models/spiral/versions/1/infer", json={"inputs": [nested]})
    np.testing.assert_allclose(np.array(reply.json()["outputs"][0]["data"], np.float32).reshape(5, 2), want,
                               rtol=1e-5, atol=1e-6)
    # Binary tensor data both ways.
    header = json.dumps({"inputs": [{"name": "points", "datatype": "FP32", "shape": [5, 2],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    reply = await client.post("/v2/models/spiral/infer", content=header + x.tobytes(),
                              headers={"Inference-Header-Content-Length": str(len(header))})
    assert reply.status_code == 200, reply.text
    size = int(reply.headers["Inference-Header-Content-Length"])
    doc = json.loads(reply.content[:size])
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == want.nbytes
    np.testing.assert_array_equal(np.frombuffer(reply.content[size:], np.float32).reshape(5, 2),
                                  reply_want := want.astype(np.float32))
    assert reply_want.shape == (5, 2)


async def test_metadata_config_stats_health_and_repository(http) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = http
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert "binary_tensor_data" in (await client.get("/v2")).json()["extensions"]
    meta = (await client.get("/v2/models/spiral")).json()
    assert meta["platform"] == "pytorch_libtorch" and meta["inputs"][0]["shape"] == [-1, 2]
    assert (await client.get("/v2/models/ox/versions/1")).json()["platform"] == "onnxruntime_onnx"
    assert (await client.get("/v2/models/spiral/ready")).status_code == 200
    assert (await client.get("/v2/models/spiral/versions/7/ready")).status_code == 400
    config = (await client.get("/v2/models/ox/config")).json()
    assert config["input"][0] == {"name": "x", "data_type": "TYPE_FP32", "dims": [tm.FEATURES]}
    stats = (await client.get("/v2/models/stats")).json()["model_stats"]
    assert {s["name"] for s in stats} == {"spiral", "ox"}
    index = (await client.post("/v2/repository/index", json={"ready": True})).json()
    assert {(e["name"], e["state"]) for e in index} == {("spiral", "READY"), ("ox", "READY")}
    assert (await client.post("/v2/repository/models/ox/unload")).status_code == 200
    await _error(await client.get("/v2/models/ox"), 404, "unloaded")
    assert (await client.post("/v2/repository/models/ox/load")).status_code == 200
    assert (await client.get("/v2/models/ox/ready")).status_code == 200
    await _error(await client.post("/v2/repository/models/nope/load"), 404, "'nope'")
    await _error(await client.post("/v2/repository/models/ox/load", json={"parameters": {"config": "{"}}),
                 400, "not valid JSON")


async def test_hostile_bodies_get_400_naming_the_tensor(http) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = http
    url = "/v2/models/spiral/infer"
    x = np.zeros((2, 2), np.float32)
    cases = [
        ({"inputs": [_json_input(np.zeros((2, 3), np.float32))]}, ("'points'", "shape")),
        ({"inputs": [_json_input(x, datatype="FP64")]}, ("'points'", "FP32")),
        ({"inputs": [{**_json_input(x), "data": [1.0, 2.0, 3.0]}]}, ("'points'", "3 values", "needs 4")),
        ({"inputs": [{**_json_input(x), "data": ["a", "b", "c", "d"]}]}, ("'points'", "not a FP32")),
        ({"inputs": [{**_json_input(x), "datatype": "FLOAT"}]}, ("'points'", "unknown datatype")),
        ({"inputs": [{**_json_input(x), "shape": [2, -2]}]}, ("'points'", "negative")),
        ({"inputs": [{**_json_input(x), "shape": [2, "2"]}]}, ("'points'", "list of integers")),
        ({"inputs": [_json_input(x, name="pts")]}, ("'pts'",)),
        ({"inputs": [_json_input(x), _json_input(x)]}, ("'points'", "twice")),
        ({"inputs": [{"name": "points", "datatype": "FP32", "shape": [2, 2]}]}, ("'points'", "neither")),
        ({"inputs": [_json_input(x)], "outputs": [{"name": "nope"}]}, ("'nope'",)),
        ({"inputs": "points"}, ("'inputs' list",)),
    ]
    for body, fragments in cases:
        await _error(await client.post(url, json=body), 400, *fragments)
    await _error(await client.post(url, content=b"{not json"), 400, "not valid JSON")
    await _error(await client.post("/v2/models/nope/infer", json={"inputs": [_json_input(x)]}), 404, "'nope'")
    # Binary data that lies about its size, or a header length past the body.
    header = json.dumps({"inputs": [{"name": "points", "datatype": "FP32", "shape": [2, 2],
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    for extra, length, fragment in ((b"\0" * 8, len(header), "runs past"),
                                    (b"\0" * 20, len(header), "belong to no input"),
                                    (b"\0" * 16, len(header) + 100, "outside the body"),
                                    (b"\0" * 16, "x", "must be an integer")):
        reply = await client.post(url, content=header + extra,
                                  headers={"Inference-Header-Content-Length": str(length)})
        await _error(reply, 400, fragment)
    # BYTES with a length prefix past the end.
    header = json.dumps({"inputs": [{"name": "points", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    reply = await client.post(url, content=header + struct.pack("<I", 1000) + b"abcd",
                              headers={"Inference-Header-Content-Length": str(len(header))})
    await _error(reply, 400, "'points'", "claims 1000 bytes")
    # Over the message limit (1 MiB here): 413, with JSON.
    big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    await _error(await client.post(url, content=big), 413, "over the limit")
    # Still serving.
    reply = await client.post(url, json={"inputs": [_json_input(x)]})
    assert reply.status_code == 200
    await _error(await client.get("/v2/nothing-here"), 404)


async def test_http_requests_are_counted_like_rpcs(http) -> None:  # type: ignore[no-untyped-def]
    from tensorwire.rpc import metrics

    client, _, _ = http
    method = "HTTP POST /v2/models/{model}/infer"
    before = metrics.RPC_HANDLED.labels("inference", method, "400")._value.get()
    await client.post("/v2/models/spiral/infer", json={"inputs": []})
    assert metrics.RPC_HANDLED.labels("inference", method, "400")._value.get() == before + 1
