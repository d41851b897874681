"""run.checkpoint against a real inference server: every checkpoint the SDK writes is
served (READY when its future resolves), whether torch.export captured the model or it fell back to TorchScript
tracing, and the real tritonclient (gRPC and HTTP, in a subprocess) gets what the
module computes. The config the SDK sends with the file is checked before any chunk."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

import tensorwire
from services.inference.app import create_app
from services.inference.settings import InferenceSettings
from tensorwire import export
from tensorwire.checkpoints.upload import upload_checkpoint
from tensorwire.client import InferenceClient
from tests.conftest import serving, settings_for
from tests.integration.test_inference_triton_repo import run_client

pytestmark = pytest.mark.slow


class Branchy(nn.Module):
    """Data-dependent Python control flow: torch.export refuses it, tracing takes one path."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > -1e9):
            return torch.tanh(self.linear(x))
        return -self.linear(x)


async def test_every_sdk_checkpoint_is_served_and_tritonclient_gets_what_the_model_computes(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    branchy = Branchy().eval()
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()
    # No repository polling: the push itself (upload + RepositoryModelLoad) makes them served.
    settings = settings_for(InferenceSettings, tmp_path, poll_interval_s=0.0)
    app = await create_app(settings)
    async with serving(app, "inference") as server:
        target = f"127.0.0.1:{server.port}"
        run = tensorwire.init(task="checkpoints", streamer="", trainer="", inference=target)
        try:
            traced = await asyncio.wrap_future(run.checkpoint(
                branchy, name="branchy", inputs=torch.randn(4, 5), directory=tmp_path / "out"))
            exported = await asyncio.wrap_future(run.checkpoint(
                cnn, name="cnn", inputs=torch.randn(2, 1, 4, 4), directory=tmp_path / "out"))
        finally:
            run.finish()
        assert traced.platform == "pytorch_libtorch" and traced.pushed_version == 1
        assert exported.platform == "torch_export" and exported.pushed_version == 1
        # Served as uploaded: the config came with the file (TorchScript has no signature).
        served = settings.model_repository / "branchy" / "config.pbtxt"
        assert served.read_text() == traced.config_text
        assert app.repository.model_ready("branchy") and app.repository.model_ready("cnn")
        out = str(tmp_path / "report")
        await asyncio.to_thread(run_client, "models", target, f"127.0.0.1:{app.http_port}", out, "branchy", "cnn")
    report = json.loads(Path(out + ".json").read_text())
    arrays = dict(np.load(out + ".npz"))
    for name, module in (("branchy", branchy), ("cnn", cnn)):
        assert report[f"{name}/http_ready"] is True
        with torch.no_grad():
            want = module(torch.from_numpy(arrays[f"{name}/in"])).numpy()
        for path in ("grpc", "http_binary", "http_json"):
            np.testing.assert_allclose(arrays[f"{name}/{path}"], want, rtol=1e-5, atol=1e-6, err_msg=f"{name}/{path}")
    assert report["branchy/http_metadata"]["platform"] == "pytorch_libtorch"
    assert report["branchy/http_config"]["parameters"]["exported_with"] == {"string_value": "torch.jit.trace"}
    assert report["cnn/http_config"]["parameters"]["exported_with"] == {"string_value": "torch.export"}
    assert report["cnn/http_config"]["max_batch_size"] == export.MAX_BATCH_SIZE
    assert report["ready_after_load"] is True


_IO = ('input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
       'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n')


@pytest.mark.parametrize(("kind", "config", "words"), [
    ("pytorch_libtorch", 'name: "m"\nplatform: "torch_export"\n', "says platform 'torch_export'"),
    ("pytorch_libtorch", 'name: "other"\nplatform: "pytorch_libtorch"\n', "names it 'other'"),
    ("pytorch_libtorch", 'name: "m"\nplatform: "pytorch_libtorch"\nmax_batch_size: 8\n', "lists no inputs"),
    ("pytorch_libtorch", 'name: "m"\ninput [ { name: x }', "config.pbtxt sent for model 'm':"),
    ("pytorch_libtorch", 'name: "m"\noptimization { priority: PRIORITY_MAX }\n', "'optimization'"),
    ("spiral", 'name: "m"\n', "comes only with a Triton model file"),
    # A model file name from the network may not leave its version folder.
    ("pytorch_libtorch", 'name: "m"\ndefault_model_filename: "../../escaped.pt"\n' + _IO,
     "default_model_filename must be a plain file name"),
    ("pytorch_libtorch", 'name: "m"\ndefault_model_filename: "/tmp/escaped.pt"\n' + _IO,
     "default_model_filename must be a plain file name"),
    ("pytorch_libtorch", 'name: "m"\ndefault_model_filename: ".."\n' + _IO,
     "default_model_filename must be a plain file name"),
])
async def test_a_bad_config_sent_with_a_model_is_refused_before_any_chunk(
    tmp_path: Path, kind: str, config: str, words: str
) -> None:
    file = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(nn.Linear(2, 2), torch.randn(1, 2)), str(file))
    settings = settings_for(InferenceSettings, tmp_path, poll_interval_s=0.0)
    app = await create_app(settings)
    async with serving(app, "inference") as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload_checkpoint(ch, file, model="m", kind=kind, triton_config=config)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in err.value.details(), err.value.details()
        assert not (settings.model_repository / "m").exists()
        # The service stays up: a good upload right after is served.
        good = 'name: "m"\nplatform: "pytorch_libtorch"\nmax_batch_size: 4\n' \
               'input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n' \
               'output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
        result = await upload_checkpoint(ch, file, model="m", kind="pytorch_libtorch", triton_config=good)
        assert result.version == 1
        await app.repository.load_model("m")
        assert app.repository.model_ready("m")


async def test_an_exported_model_pushed_to_inference_computes_what_the_module_does(tmp_path: Path) -> None:
    """export.export_model then export.push to a real inference server: the pushed
    version becomes ready and answers what the module computes."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    exported = export.export_model(model, (torch.randn(2, 4),), tmp_path / "out", "pushed")
    app = await create_app(settings_for(InferenceSettings, tmp_path))
    async with serving(app, "inference") as server:
        target = f"127.0.0.1:{server.port}"
        version = await export.push(exported, target)
        assert version >= 1
        async with InferenceClient(target) as client:
            x = np.random.rand(3, 4).astype(np.float32)
            for _ in range(100):  # the server loads the pushed version in the background
                if await client.model_ready("pushed"):
                    break
                await asyncio.sleep(0.1)
            outputs = await client.infer("pushed", {exported.inputs[0]: x})
        with torch.no_grad():
            np.testing.assert_allclose(outputs["OUTPUT__0"], model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
