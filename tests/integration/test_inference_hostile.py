"""Hostile inputs get precise statuses with clear messages; the service stays healthy."""

from __future__ import annotations

import asyncio
import struct
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.inference.app import create_app
from services.inference.settings import InferenceSettings
from tensorwire.data import oip
from tensorwire.data.tensors import TYPED_FIELD, Tensor, encode_raw
from tensorwire.errors import InvalidArgumentError
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc
from tensorwire.rpc.server import GrpcServer, ServerOptions
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tests.conftest import settings_for
from tests.support.waiting import until

pytestmark = pytest.mark.usefixtures("inference_frontend")  # both frontends: python, native

Input = pb.ModelInferRequest.InferInputTensor
MAX_MESSAGE = 1 << 20


def raw_request(model: str, name: str, datatype: str, shape: list[int], data: bytes, **kw) -> pb.ModelInferRequest:  # type: ignore[no-untyped-def]
    return pb.ModelInferRequest(model_name=model, inputs=[Input(name=name, datatype=datatype, shape=shape)],
                                raw_input_contents=[data], **kw)


def good() -> pb.ModelInferRequest:
    return raw_request("spiral", "points", "FP32", [2, 2], np.ones((2, 2), np.float32).tobytes())


@pytest.fixture
async def app_of(tmp_path: Path):  # type: ignore[no-untyped-def]
    repo = tmp_path / "models"
    modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral").state_dict(),
                            config_overrides={"max_batch_size": 8})
    return await create_app(settings_for(InferenceSettings, tmp_path, model_repository=repo,
                                         poll_interval_s=0.0, max_queue_size=2))


@pytest.fixture
async def stub(app_of):  # type: ignore[no-untyped-def]
    app = app_of
    server = GrpcServer(ServerOptions(name="inference", host="127.0.0.1", port=0, metrics_port=None,
                                      max_message_bytes=MAX_MESSAGE), app)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                        options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        yield pb_grpc.GRPCInferenceServiceStub(channel), server.port
    finally:
        await channel.close()
        await server.stop(0.5)


CASES = {
    "wrong dtype": (raw_request("spiral", "points", "FP64", [1, 2], np.ones(2).tobytes()),
                    grpc.StatusCode.INVALID_ARGUMENT, "must be FP32, got FP64"),
    "wrong shape": (raw_request("spiral", "points", "FP32", [1, 3], np.ones(3, np.float32).tobytes()),
                    grpc.StatusCode.INVALID_ARGUMENT, "must have shape [B, 2], got [1, 3]"),
    "raw size mismatch": (raw_request("spiral", "points", "FP32", [4, 2], b"\0" * 12),
                          grpc.StatusCode.INVALID_ARGUMENT, "hold 12 bytes but shape [4, 2] of FP32 needs 32"),
    "raw and typed": (pb.ModelInferRequest(
        model_name="spiral",
        inputs=[Input(name="points", datatype="FP32", shape=[1, 2],
                      contents=pb.InferTensorContents(fp32_contents=[1, 2]))],
        raw_input_contents=[np.ones(2, np.float32).tobytes()]),
        grpc.StatusCode.INVALID_ARGUMENT, "send one or the other"),
    "typed count mismatch": (pb.ModelInferRequest(
        model_name="spiral",
        inputs=[Input(name="points", datatype="FP32", shape=[2, 2],
                      contents=pb.InferTensorContents(fp32_contents=[1, 2, 3]))]),
        grpc.StatusCode.INVALID_ARGUMENT, "3 values in contents.fp32_contents but shape [2, 2] needs 4"),
    "batch > max": (raw_request("spiral", "points", "FP32", [9, 2], np.ones((9, 2), np.float32).tobytes()),
                    grpc.StatusCode.INVALID_ARGUMENT, "batch of 9 is outside 1..8"),
    "huge declared shape": (raw_request("spiral", "points", "FP32", [1 << 40, 2], b"\0" * 8),
                            grpc.StatusCode.INVALID_ARGUMENT, "needs 8796093022208"),
    "negative dim": (raw_request("spiral", "points", "FP32", [-1, 2], b""),
                     grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
    "unknown datatype": (raw_request("spiral", "points", "FP128", [1, 2], b""),
                         grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype 'FP128'"),
    "missing input": (pb.ModelInferRequest(model_name="spiral"),
                      grpc.StatusCode.INVALID_ARGUMENT, "needs input 'points'"),
    "extra input": (raw_request("spiral", "pointz", "FP32", [1, 2], b"\0" * 8),
                    grpc.StatusCode.INVALID_ARGUMENT, "has no input 'pointz'"),
    "unknown output": (raw_request("spiral", "points", "FP32", [1, 2], b"\0" * 8,
                                   outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]),
                       grpc.StatusCode.INVALID_ARGUMENT, "has no output 'nope'"),
    "raw count mismatch": (pb.ModelInferRequest(model_name="spiral",
                                                inputs=[Input(name="points", datatype="FP32", shape=[1, 2])],
                                                raw_input_contents=[b"\0" * 8, b"\0" * 8]),
                           grpc.StatusCode.INVALID_ARGUMENT, "1 inputs but 2 raw_input_contents"),
    "unknown model": (raw_request("nope", "points", "FP32", [1, 2], b"\0" * 8),
                      grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "unknown version": (raw_request("spiral", "points", "FP32", [1, 2], b"\0" * 8, model_version="7"),
                        grpc.StatusCode.NOT_FOUND, "has no ready version 7 (ready: 1)"),
    "bad version": (raw_request("spiral", "points", "FP32", [1, 2], b"\0" * 8, model_version="latest"),
                    grpc.StatusCode.INVALID_ARGUMENT, "positive integer, got 'latest'"),
    "huge message": (raw_request("spiral", "points", "FP32", [1, 2], b"\0" * (2 * MAX_MESSAGE)),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
}


async def test_hostile_requests_get_precise_statuses(stub) -> None:  # type: ignore[no-untyped-def]
    client, _ = stub
    for label, (request, code, message) in CASES.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.ModelInfer(request, timeout=10)
        assert info.value.code() == code, f"{label}: {info.value.code()} {info.value.details()}"
        assert message in (info.value.details() or ""), f"{label}: {info.value.details()!r}"
        # Healthy after every one.
        assert (await client.ModelInfer(good(), timeout=10)).model_version == "1"
    for bad in (pb.ModelMetadataRequest(name="nope"), pb.ModelConfigRequest(name="nope")):
        rpc = client.ModelMetadata if isinstance(bad, pb.ModelMetadataRequest) else client.ModelConfig
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    for bad_name in ("../etc", "nope"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=bad_name), timeout=10)
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.RepositoryModelLoad(pb.RepositoryModelLoadRequest(
            model_name="spiral", parameters={"config": pb.ModelRepositoryParameter(string_param="{nope")}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not valid JSON" in info.value.details()
    assert (await client.ServerReady(pb.ServerReadyRequest())).ready


async def test_malformed_protobuf_is_invalid_argument(stub) -> None:  # type: ignore[no-untyped-def]
    client, port = stub
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\xff\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await client.ModelInfer(good(), timeout=10)).model_version == "1"


async def test_full_queue_is_resource_exhausted(stub, app_of) -> None:  # type: ignore[no-untyped-def]
    client, _ = stub
    repository = app_of.repository
    gate = threading.Event()
    version = repository.version_of("spiral", "1")
    if app_of.frontend is None:
        # Occupy every inference thread, so the first batch cannot start and the queue fills.
        blockers = [repository.infer_executor.submit(gate.wait, 30)
                    for _ in range(repository.options.infer_threads)]
        batcher = version.batcher
        running, depth = (lambda: batcher.in_flight), (lambda: batcher.queue_depth)
    else:
        # The native frontend's batch threads: the first batch's forward waits at the gate.
        forward = version.forward_columns
        version.forward_columns = lambda *a: (gate.wait(30), forward(*a))[1]  # type: ignore[method-assign]
        blockers = []
        running = lambda: app_of.frontend.stats()["running"]  # noqa: E731
        depth = lambda: app_of.frontend.stats()["queued"]  # noqa: E731
    try:
        first = asyncio.ensure_future(client.ModelInfer(good(), timeout=30))
        await until(lambda: running() == 1)
        queued = [asyncio.ensure_future(client.ModelInfer(good(), timeout=30)) for _ in range(2)]
        await until(lambda: depth() == 2)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.ModelInfer(good(), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full (2 waiting)" in info.value.details()
    finally:
        gate.set()
    for reply in await asyncio.gather(first, *queued):
        assert reply.model_version == "1"
    for blocker in blockers:
        blocker.result(10)
    assert (await client.ModelInfer(good(), timeout=10)).model_version == "1"
    # Both frontends count the refusals where the batcher's metrics show them (the
    # native one reports them with the queue's next batch).
    assert version.batcher.metrics.rejected == 3


def test_codec_round_trips_every_datatype() -> None:
    arrays = {
        "BOOL": np.array([[True, False]]), "INT8": np.array([[-3, 4]], np.int8),
        "INT16": np.array([[-300, 4]], np.int16), "INT32": np.array([[-7, 1 << 30]], np.int32),
        "INT64": np.array([[-(1 << 40), 5]], np.int64), "UINT8": np.array([[250, 1]], np.uint8),
        "UINT16": np.array([[65000, 1]], np.uint16), "UINT32": np.array([[1 << 31, 1]], np.uint32),
        "UINT64": np.array([[1 << 63, 1]], np.uint64), "FP16": np.array([[1.5, -2]], np.float16),
        "FP32": np.array([[1.25, -2]], np.float32), "FP64": np.array([[1e300, -2]], np.float64),
        "BYTES": np.array([[b"ab", b""]], dtype=object),
    }
    for raw in (True, False):
        tensors = [Tensor(f"t{dt}", dt, a) for dt, a in arrays.items()]
        response = oip.encode_outputs(pb.ModelInferResponse(), tensors, raw=raw)
        decoded = oip.decode_outputs(pb.ModelInferResponse.FromString(response.SerializeToString()))
        # And back in as a request, raw or typed (FP16 only travels raw).
        request = pb.ModelInferRequest()
        for t in tensors:
            if not raw and t.datatype == "FP16":
                continue
            request.inputs.add(name=t.name, datatype=t.datatype, shape=t.array.shape)
            if raw:
                request.raw_input_contents.append(encode_raw(t.array, t.datatype))
            else:
                field = getattr(request.inputs[-1].contents, TYPED_FIELD[t.datatype])
                field.extend(t.array.reshape(-1).tolist())
        inputs, was_raw = oip.decode_inputs(request)
        assert was_raw is raw
        for dt, a in arrays.items():
            np.testing.assert_array_equal(decoded[f"t{dt}"], a)
            assert decoded[f"t{dt}"].dtype == (a.dtype if dt != "BYTES" else object)
        for t in inputs:
            np.testing.assert_array_equal(t.array, arrays[t.datatype])
    with pytest.raises(InvalidArgumentError, match="FP16 has no typed contents"):
        bad = pb.ModelInferRequest(inputs=[Input(name="h", datatype="FP16", shape=[1])])
        oip.decode_inputs(bad)
    with pytest.raises(InvalidArgumentError, match="claims 100 bytes"):
        bad = pb.ModelInferRequest(inputs=[Input(name="s", datatype="BYTES", shape=[1])],
                                   raw_input_contents=[struct.pack("<I", 100) + b"x"])
        oip.decode_inputs(bad)


DATATYPES = ["FP32", "FP64", "FP16", "INT32", "INT64", "BOOL", "BYTES", "UINT8", "", "??"]


@st.composite
def requests(draw) -> pb.ModelInferRequest:  # type: ignore[no-untyped-def]
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["spiral", "spiral", "nope", "", "../x"])),
        model_version=draw(st.sampled_from(["", "", "1", "2", "-1", "x"])),
    )
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["points", "points", "other", ""])),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(st.lists(st.integers(-2, 1 << 33) | st.integers(0, 4), max_size=5)),
        )
        if raw:
            request.raw_input_contents.append(draw(st.binary(max_size=96)))
        elif draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=12)))
    for name in draw(st.lists(st.sampled_from(["logits", "x"]), max_size=2)):
        request.outputs.add(name=name)
    return request


async def test_fuzzed_requests_never_break_the_service(stub) -> None:  # type: ignore[no-untyped-def]
    _, port = stub
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.RESOURCE_EXHAUSTED}
    seen: set[grpc.StatusCode] = set()

    def fuzz() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = pb_grpc.GRPCInferenceServiceStub(channel)

            @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
            @given(requests())
            def one(request: pb.ModelInferRequest) -> None:
                try:
                    client.ModelInfer(request, timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                    assert exc.details(), "an error without a message"
                seen.add(code)
                assert code in allowed, f"{code} for {request}"

            one()
            assert client.ServerLive(pb.ServerLiveRequest()).live
            assert client.ModelInfer(good(), timeout=10).model_version == "1"

    await asyncio.to_thread(fuzz)
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
