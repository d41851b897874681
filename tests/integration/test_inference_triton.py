"""tritonclient (the real PyPI package) against a real tensorwire inference server.

tritonclient runs in a subprocess (its protobuf symbols clash with ours); the
server runs in this process on port 0, serving models trained for a few steps
and written through tensorwire.serving.modelrepo, and predictions are compared with a
torch forward of the same weights in this process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from services.inference.app import create_app
from services.inference.settings import InferenceSettings
from tensorwire.inference import grpc_service_pb2, model_config_pb2
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model, example_inputs
from tests.conftest import serving, settings_for
from tests.support.triton_client import message_fields

pytestmark = pytest.mark.usefixtures("inference_frontend")  # both frontends: python, native

ROOT = Path(__file__).resolve().parents[2]
CONFIG_SUBSET = {
    "inference.ModelConfig", "inference.ModelInput", "inference.ModelOutput",
    "inference.ModelDynamicBatching", "inference.ModelInstanceGroup",
}
KINDS = ("trajectory", "anomaly", "fusion", "detection", "spiral")


def trained_state(kind: str, steps: int = 5) -> dict[str, torch.Tensor]:
    """A few real optimisation steps (towards a fixed random target) so weights are not the init."""
    torch.manual_seed(hash(kind) % 1000)
    model = build_model(kind)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = example_inputs(kind, batch=8)
    for _ in range(steps):
        out = model(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.pow(2).mean() for o in outs)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.state_dict()


def forward(repo: Path, name: str, version: int, inputs: list[np.ndarray]) -> list[np.ndarray]:
    config = modelrepo.read_config(repo, name)
    model = build_model(config["kind"], **config["model_args"])
    model.load_state_dict(modelrepo.load_state_dict(modelrepo.weights_path(repo, name, version)))
    model.eval()
    with torch.no_grad():
        out = model(*(torch.from_numpy(a) for a in inputs))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def run_client(*args: str, timeout: float = 120) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.triton_client", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for kind in KINDS:
        modelrepo.write_version(root, kind, kind, trained_state(kind))
    modelrepo.write_version(root, "run-42", "spiral", trained_state("spiral", 9))
    return root


@pytest.mark.parametrize("model", ["detection", "anomaly"])
async def test_tritonclient_calls_every_rpc(model: str, repo: Path, tmp_path: Path) -> None:
    settings = settings_for(InferenceSettings, tmp_path, model_repository=repo, poll_interval_s=0.0)
    app = await create_app(settings)
    async with serving(app, "inference") as server:
        out = str(tmp_path / "report")
        await asyncio.to_thread(run_client, "rpcs", f"127.0.0.1:{server.port}", model, "run-42", out)
        if app.frontend is not None:  # tritonclient's stream was served natively
            assert app.frontend.stats()["streams"] == 1
    report = json.loads(Path(out + ".json").read_text())
    arrays = dict(np.load(out + ".npz"))

    assert report["live"] is True and report["ready"] is True
    assert report["server_metadata"]["name"] == "tensorwire"
    assert "model_repository" in report["server_metadata"]["extensions"]
    meta = report["model_metadata"]
    assert meta["name"] == model and meta["versions"] == ["1"]
    assert meta["platform"] == "pytorch_libtorch"
    config = modelrepo.read_config(repo, model)
    assert [i["name"] for i in meta["inputs"]] == [i["name"] for i in config["inputs"]]
    assert meta["inputs"][0]["shape"] == ["-1", *[str(d) for d in config["inputs"][0]["dims"]]]
    cfg = report["model_config"]["config"]
    assert cfg["max_batch_size"] == 64 and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert report["model_ready"] is True and report["unknown_model_ready"] is False
    indexed = {(m["name"], m.get("version", "")): m["state"] for m in report["index"]["models"]}
    assert {("spiral", "1"), (model, "1")} <= set(indexed)
    assert indexed[("run-42", "")] == "UNAVAILABLE"  # a trainer's run model: loaded on its first request

    # Every prediction equals a torch forward of the same weights in this process.
    out_names = [o["name"] for o in config["outputs"]]
    in_names = [i["name"] for i in config["inputs"]]
    tags = ["infer", "async", *(f"stream{i}" for i in range(4))]
    for tag in tags:
        expected = forward(repo, model, 1, [arrays[f"{tag}/in/{n}"] for n in in_names])
        for name, want in zip(out_names, expected):
            np.testing.assert_allclose(arrays[f"{tag}/out/{name}"], want, rtol=1e-5, atol=1e-6)
    assert report["selected_outputs"] == [out_names[-1]]
    want = forward(repo, model, 1, [arrays[f"select/in/{n}"] for n in in_names])[-1]
    np.testing.assert_allclose(arrays[f"select/out/{out_names[-1]}"], want, rtol=1e-5, atol=1e-6)
    assert report["infer_response"]["id"] == "req-1"

    assert len(report["stream_errors"]) == 1 and "no-such-model" in report["stream_errors"][0]
    stats = report["statistics"]["model_stats"][0]
    assert stats["name"] == model
    # 3 + 2 + 1 + (1+2+3+4) rows were inferred.
    assert int(stats["inference_count"]) == 16
    assert int(stats["inference_stats"]["success"]["count"]) == 7
    assert len(report["all_statistics"]["model_stats"]) >= len(KINDS)
    assert report["unknown_model_error"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in report["unknown_model_error"]["message"]

    assert report["spare_ready_after_unload"] is False
    states = {m["name"]: m["state"] for m in report["index_after_unload"]["models"]}
    assert states["run-42"] == "UNAVAILABLE"
    assert report["spare_ready_after_load"] is True
    assert report["config_after_load"]["config"]["dynamic_batching"]["max_queue_delay_microseconds"] == "100"


def test_proto_matches_triton_field_by_field(tmp_path: Path) -> None:
    out = tmp_path / "triton.json"
    run_client("descriptors", str(out))
    triton = json.loads(out.read_text())
    ours = message_fields(grpc_service_pb2, model_config_pb2)
    assert len(ours) > 30
    for message, fields in ours.items():
        assert message in triton["messages"], f"{message} is not a Triton message"
        theirs = triton["messages"][message]
        for name, spec in fields.items():
            assert name in theirs, f"{message}.{name} is not in Triton's {message}"
            assert spec == theirs[name], f"{message}.{name}: ours {spec} vs Triton {theirs[name]}"
        if message not in CONFIG_SUBSET:
            # Protocol messages are complete; only the model-config messages are a subset.
            assert set(fields) == set(theirs), f"{message}: missing {set(theirs) - set(fields)}"
    enum = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in enum.values} == triton["enums"]["inference.DataType"]
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert [method.input_type.full_name, method.output_type.full_name,
                method.client_streaming, method.server_streaming] == triton["methods"][method.name]
