"""tensorwire.client against the real inference service on real sockets:
wait_for_ready, retries with backoff only for idempotent calls, deadlines, domain errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from services.inference.app import create_app
from services.inference.settings import InferenceSettings
from tensorwire.client import InferenceClient, RetryPolicy, decode_outputs
from tensorwire.errors import DeadlineExceededError, UnavailableError
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.rpc.server import GrpcServer, ServerOptions
from tests.conftest import free_port, settings_for

FAST = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


async def _start_inference(tmp_path: Path, port: int) -> GrpcServer:
    app = await create_app(settings_for(InferenceSettings, tmp_path))
    server = GrpcServer(ServerOptions(name="inference", host="127.0.0.1", port=port), app)
    await server.start()
    return server


async def test_wait_for_ready_rides_out_a_server_that_starts_late(tmp_path: Path) -> None:
    port = free_port()
    async with InferenceClient(f"127.0.0.1:{port}", timeout_s=30) as client:
        call = asyncio.create_task(client.server_live())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not call.done()
        server = await _start_inference(tmp_path, port)
        try:
            assert await call is True
            assert client.retries == 0
            assert client.pool.metrics.created == 1
        finally:
            await server.stop(0.5)


async def test_idempotent_calls_retry_unavailable_with_backoff(tmp_path: Path) -> None:
    port = free_port()
    async with InferenceClient(f"127.0.0.1:{port}", retry=FAST, wait_for_ready=False) as client:
        with pytest.raises(UnavailableError, match="ServerReady: "):
            await client.server_ready()
        assert client.retries == FAST.attempts - 1
        assert client.pool.metrics.failed == FAST.attempts

        client.retries = 0
        slow = RetryPolicy(attempts=50, initial_backoff_s=0.02, max_backoff_s=0.05)
        client.retry = slow
        call = asyncio.create_task(client.server_ready())
        for _ in range(2000):  # start the server once the client has retried
            if client.retries:
                break
            await asyncio.sleep(0.005)
        assert client.retries >= 1
        server = await _start_inference(tmp_path, port)
        try:
            assert await call is True
        finally:
            await server.stop(0.5)


async def test_non_idempotent_upload_is_not_retried(tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(4)}, ckpt)
    port = free_port()
    async with InferenceClient(f"127.0.0.1:{port}", retry=FAST, wait_for_ready=False) as client:
        with pytest.raises(UnavailableError, match="UploadModel"):
            await client.upload_checkpoint(ckpt, model="m", kind="spiral")
        assert client.retries == 0


async def test_deadline_covers_the_whole_call() -> None:
    port = free_port()
    async with InferenceClient(f"127.0.0.1:{port}", timeout_s=0.3) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeadlineExceededError):
            await client.server_live()
        assert loop.time() - started < 5


def test_infer_request_encoding_round_trips() -> None:
    points = np.arange(8, dtype=np.float32).reshape(4, 2)
    labels = np.array([1, 0, 1, 1], dtype=np.int64)
    request = InferenceClient.infer_request("spiral", {"points": points, "labels": labels},
                                            outputs=["logits"])
    assert [t.datatype for t in request.inputs] == ["FP32", "INT64"]
    assert list(request.inputs[0].shape) == [4, 2]
    assert [o.name for o in request.outputs] == ["logits"]
    # Serve the inputs back as outputs: what decode_outputs reads is what was sent.
    reply = pb.ModelInferResponse(model_name="spiral")
    for tensor, raw in zip(request.inputs, request.raw_input_contents):
        reply.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        reply.raw_output_contents.append(raw)
    out = decode_outputs(reply)
    np.testing.assert_array_equal(out["points"], points)
    np.testing.assert_array_equal(out["labels"], labels)
    big_endian = np.arange(3, dtype=">f4")
    request = InferenceClient.infer_request("m", {"x": big_endian})
    assert np.frombuffer(request.raw_input_contents[0], "<f4").tolist() == [0.0, 1.0, 2.0]


async def test_sync_client_infers_by_tensor_name_with_numpy_in_and_out(tmp_path: Path) -> None:
    """The scripts' client: blocking calls, ``infer("spiral", points=array)``, numpy back,
    the same domain errors, a token from the environment when the server wants one."""
    from tensorwire.client import SyncInferenceClient
    from tensorwire.errors import NotFoundError, UnauthenticatedError
    from tensorwire.rpc.auth import Authorizer, TokenFile
    from tensorwire.serving import modelrepo
    from tensorwire.serving.models import build_model

    torch.manual_seed(0)
    model = build_model("spiral")
    settings = settings_for(InferenceSettings, tmp_path)
    modelrepo.write_version(settings.model_repository, "spiral", "spiral", model.state_dict())
    tokens = tmp_path / "tokens.csv"
    tokens.write_text('script-token,script,1,"tensorwire:viewer"\n')
    app = await create_app(settings)
    server = GrpcServer(ServerOptions(name="inference", host="127.0.0.1", port=0,
                                      authorizer=Authorizer(TokenFile(tokens))), app)
    port = await server.start()
    points = np.random.default_rng(1).standard_normal((5, 2)).astype(np.float32)

    def script(env: dict[str, str]) -> dict[str, np.ndarray]:
        from tensorwire.rpc.auth import ClientSecurity

        with SyncInferenceClient(f"127.0.0.1:{port}", timeout_s=30,
                                 security=ClientSecurity.from_env(env)) as client:
            assert client.server_ready()
            with pytest.raises(NotFoundError):
                client.infer("no-such-model", points=points)
            return client.infer("spiral", points=points)

    try:
        with pytest.raises(UnauthenticatedError):
            await asyncio.to_thread(script, {})
        out = await asyncio.to_thread(script, {"TENSORWIRE_TOKEN": "script-token"})
    finally:
        await server.stop(0.5)
    with torch.no_grad():
        expected = model(torch.from_numpy(points)).numpy()
    (_name, got), = out.items()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
