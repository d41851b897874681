"""The native inference frontend (native/frontend.cc): what it serves itself, that it
answers exactly as the Python frontend does (differential fuzzing, random bytes),
role checks, health and reflection on its port, statistics and metrics, and the
one start-up line that says which frontend serves.

Real servers on port 0, real torch models; the native tests skip (saying why)
where scripts/build-native.sh could not build the extension.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.inference import native
from services.inference.app import InferenceApp, create_app
from services.inference.repository import ModelRepository
from services.inference.settings import InferenceSettings
from tensorwire.data import oip
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc
from tensorwire.rpc.auth import Authorizer, TokenFile
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model
from tests.conftest import serving, settings_for
from tests.integration.test_inference_hostile import requests as fuzzed_requests
from tests.integration.test_security import TOKENS, bearer, write_tokens

MODULE, WHY = native.load_module()
needs_native = pytest.mark.skipif(MODULE is None, reason=f"native frontend {WHY}")
INFER = "/inference.GRPCInferenceService/ModelInfer"
ROOT = Path(__file__).resolve().parents[2]


def spiral_repo(tmp_path: Path, **config: object) -> Path:
    repo = tmp_path / "models"
    torch.manual_seed(3)
    modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral").state_dict(),
                            config_overrides={"max_batch_size": 8, **config})
    return repo


def request(x: np.ndarray, **kw: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="spiral", id=str(kw.pop("id", "")),
        inputs=[pb.ModelInferRequest.InferInputTensor(name="points", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()], **kw,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def server_of(tmp_path: Path, frontend: str, repo: Path, **options: object) -> AsyncIterator[tuple[InferenceApp, int]]:
    app = await create_app(settings_for(InferenceSettings, tmp_path / frontend, model_repository=repo,
                                        poll_interval_s=0.0, frontend=frontend))
    async with serving(app, "inference", **options) as server:
        yield app, server.port


def test_start_up_line_names_the_frontend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path)
    assert native.choose("python", repository, 2, tls=False) == (None, "frontend: python (--frontend python)")
    monkeypatch.setattr(native, "load_module", lambda: (None, "not built (no module)"))
    frontend, line = native.choose("auto", repository, 2, tls=False)
    assert frontend is None and line == "frontend: python (the native frontend is not built (no module))"
    with pytest.raises(RuntimeError, match="--frontend native: the native frontend is not built"):
        native.choose("native", repository, 2, tls=False)
    monkeypatch.setattr(native, "load_module", lambda: (object(), "grpc++ 1.51.1"))
    assert native.choose("auto", repository, 2, tls=True)[1].startswith("frontend: python (TLS is on")
    frontend, line = native.choose("auto", repository, 3, tls=False)
    assert frontend is not None and line == "frontend: native (grpc++ 1.51.1; 3 batch threads)"
    line = native.choose("auto", repository, 3, tls=False, streams=False)[1]
    assert line == "frontend: native (grpc++ 1.51.1; 3 batch threads; streams forwarded)"


@needs_native
async def test_model_infer_is_served_natively_in_batches(tmp_path: Path) -> None:
    repo = spiral_repo(tmp_path, max_queue_delay_us=2000)
    model = build_model("spiral")
    model.load_state_dict(modelrepo.load_state_dict(modelrepo.weights_path(repo, "spiral", 1)))
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((int(rng.integers(1, 5)), 2)).astype(np.float32) for _ in range(64)]
    labels = {"service": "inference", "method": "ModelInfer", "code": "OK"}
    async with server_of(tmp_path, "native", repo) as (app, port):
        assert app.frontend is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # The native side learns a model's rules from Python at its first request
            # (requests meanwhile go through Python): warm up until it serves natively.
            for _ in range(100):
                await stub.ModelInfer(request(xs[0]), timeout=10)
                if app.frontend.stats()["native"]:
                    break
            stats0 = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="spiral"), timeout=10)).model_stats[0]
            base = app.frontend.stats()  # after: ModelStatistics is forwarded (proxied) too
            before = REGISTRY.get_sample_value("tensorwire_rpc_handled_total", labels) or 0.0
            replies = await asyncio.gather(*(stub.ModelInfer(request(x, id=i), timeout=10) for i, x in enumerate(xs)))
            for i, (x, reply) in enumerate(zip(xs, replies)):
                assert (reply.model_name, reply.model_version, reply.id) == ("spiral", "1", str(i))
                with torch.no_grad():
                    want = model(torch.from_numpy(x)).numpy()
                np.testing.assert_allclose(oip.decode_outputs(reply)["logits"], want, rtol=1e-5, atol=1e-6)
            # Only the requested outputs; an unknown one goes to Python, which names it.
            reply = await stub.ModelInfer(request(xs[0], outputs=[{"name": "logits"}]), timeout=10)
            assert [o.name for o in reply.outputs] == ["logits"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request(xs[0], outputs=[{"name": "nope"}]), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "has no output 'nope'" in info.value.details()
            now = app.frontend.stats()
            stats = {k: now[k] - base[k] for k in ("native", "fallbacks", "batches", "proxied")}
            # All but the bad output name natively; on a loaded machine a request may
            # meet the model's rules being re-read and go through Python (same answer).
            assert stats["native"] + stats["proxied"] == 66 and stats["proxied"] >= 1, (base, now)
            assert stats["native"] >= 56 and stats["fallbacks"] == 0, (base, now)
            assert stats["batches"] < stats["native"], stats  # concurrent requests shared forwards
            # Statistics and metrics count the natively served requests.
            reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="spiral"), timeout=10)
            s = reply.model_stats[0]
            assert s.inference_count - stats0.inference_count == sum(len(x) for x in xs) + len(xs[0])
            assert s.inference_stats.success.count - stats0.inference_stats.success.count == 65
            assert s.inference_stats.queue.count - stats0.inference_stats.queue.count == 65
            assert s.execution_count - stats0.execution_count >= stats["batches"]
            assert REGISTRY.get_sample_value("tensorwire_rpc_handled_total", labels) - before == 65
            # A stream goes through the Python server behind it, on the same port.
            async def stream() -> AsyncIterator[pb.ModelInferRequest]:
                for i in range(3):
                    yield request(xs[i], id=f"s{i}")

            ids = [r.infer_response.id async for r in stub.ModelStreamInfer(stream(), timeout=10)]
            assert sorted(ids) == ["s0", "s1", "s2"]


@needs_native
async def test_deadlines_and_cancellation_while_queued(tmp_path: Path) -> None:
    """A request whose deadline passes in the native queue is dropped before its batch
    runs (the client sees DEADLINE_EXCEEDED) and counted as dropped by the version's
    batcher; the rest are served once the model frees."""
    import threading

    async with server_of(tmp_path, "native", spiral_repo(tmp_path)) as (app, port):
        assert app.frontend is not None
        version = app.repository.version_of("spiral", "1")
        gate = threading.Event()
        forward = version.forward_columns
        version.forward_columns = lambda *a: (gate.wait(30), forward(*a))[1]  # type: ignore[method-assign]
        x = np.ones((1, 2), np.float32)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            first = asyncio.ensure_future(stub.ModelInfer(request(x), timeout=30))
            while app.frontend.stats()["running"] != 1:
                await asyncio.sleep(0.005)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request(x), timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            later = asyncio.ensure_future(stub.ModelInfer(request(x), timeout=30))
            while app.frontend.stats()["queued"] != 2:
                await asyncio.sleep(0.005)
            gate.set()
            assert (await first).model_version == "1" and (await later).model_version == "1"
            stats = app.frontend.stats()
            # Dropped, not run: "cancelled" once gRPC has cancelled the call at its
            # deadline, else "expired"; the batcher counts it as for a Python-served one.
            assert stats["expired"] + stats["cancelled"] == 1, stats
            assert stats["native"] == 2 and stats["queued"] == 0, stats
            m = version.batcher.metrics
            assert (m.dropped_cancelled, m.dropped_expired) == (stats["cancelled"], stats["expired"])


@needs_native
async def test_health_reflection_and_draining_on_the_native_port(tmp_path: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with server_of(tmp_path, "native", spiral_repo(tmp_path)) as (_, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            names = [s.name async for r in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask())
                     for s in r.list_services_response.service]
            assert "inference.GRPCInferenceService" in names and "grpc.health.v1.Health" in names


@needs_native
async def test_roles_are_checked_on_the_native_path(tmp_path: Path) -> None:
    authorizer = Authorizer(TokenFile(write_tokens(tmp_path / "tokens.csv")))
    x = np.ones((1, 2), np.float32)
    async with server_of(tmp_path, "native", spiral_repo(tmp_path), authorizer=authorizer) as (app, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for metadata, code, words in [
                ((), grpc.StatusCode.UNAUTHENTICATED, "needs a bearer token"),
                ((("authorization", "Bearer wrong-token"),), grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token"),
                ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED, "needs a bearer token"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ModelInfer(request(x), metadata=metadata, timeout=10)
                assert info.value.code() == code and words in info.value.details()
            for role in ("viewer", "admin"):
                for _ in range(3):
                    assert (await stub.ModelInfer(request(x), metadata=bearer(role), timeout=10)).model_version == "1"
            # Loads need admin: forwarded, refused by the same table.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="spiral"),
                                               metadata=bearer("viewer"), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert app.frontend is not None and app.frontend.stats()["native"] == 6
    assert TOKENS  # the table test_security uses


def _outcome(call: grpc.UnaryUnaryMultiCallable, body: bytes) -> tuple[str, str, bytes]:
    try:
        reply = call(body, timeout=10)
        return "OK", "", reply
    except grpc.RpcError as exc:
        return exc.code().name, exc.details(), b""


@needs_native
async def test_native_answers_exactly_as_python_does(tmp_path: Path) -> None:
    """Differential fuzzing: the hostile-input strategy, random bytes and bit flips of a
    valid request, sent to a Python-frontend and a native-frontend server of the same
    repository: the same status, message and reply bytes, and both stay up."""
    repo = spiral_repo(tmp_path)
    async with server_of(tmp_path, "python", repo) as (_, py_port), \
            server_of(tmp_path, "native", repo) as (app, native_port):

        def fuzz() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{py_port}") as a, grpc.insecure_channel(f"127.0.0.1:{native_port}") as b:
                ours, theirs = a.unary_unary(INFER), b.unary_unary(INFER)

                def same(body: bytes) -> None:
                    expected, got = _outcome(ours, body), _outcome(theirs, body)
                    assert got == expected, body

                @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
                @given(fuzzed_requests())
                def structured(req: pb.ModelInferRequest) -> None:
                    same(req.SerializeToString())

                @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
                @given(st.binary(max_size=200))
                def random_bytes(body: bytes) -> None:
                    same(body)

                structured()
                random_bytes()
                valid = request(np.ones((2, 2), np.float32), id="v").SerializeToString()
                rng = random.Random(7)
                for _ in range(300):
                    body = bytearray(valid)
                    for _ in range(rng.randint(1, 4)):
                        body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
                    same(bytes(body))

        await asyncio.to_thread(fuzz)
        assert app.frontend is not None
        stats = app.frontend.stats()
        assert stats["native"] > 0 and stats["proxied"] > 0, stats
        async with grpc.aio.insecure_channel(f"127.0.0.1:{native_port}") as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request(np.ones((1, 2), np.float32)))
            assert reply.model_version == "1"


@pytest.mark.skipif(os.environ.get("TENSORWIRE_ASAN_FUZZ") != "1",
                    reason="opt-in (TENSORWIRE_ASAN_FUZZ=1): builds the extension with AddressSanitizer (minutes)")
@pytest.mark.timeout(2400)  # the ASan build alone takes 3-9 minutes here
def test_native_decoder_under_address_sanitizer() -> None:
    """The native tests above (differential fuzzing included) and the hot-swap tests
    (forwarded calls during swaps) against an AddressSanitizer + UBSan build of the
    extension: any memory error aborts."""
    subprocess.run(["bash", "scripts/build-native.sh", sys.executable, "--asan"], cwd=ROOT, check=True)
    module = next((ROOT / "build" / "native-asan").glob("_native*.so"))
    runtime = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=True).stdout.strip()
    # libstdc++ preloaded with the runtime: otherwise ASan's __cxa_throw interceptor finds
    # no real __cxa_throw and aborts at the first C++ exception (a batch Python refused).
    libstdcxx = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                               check=True).stdout.strip()
    env = {**os.environ, "TENSORWIRE_NATIVE_MODULE": str(module), "LD_PRELOAD": f"{runtime} {libstdcxx}",
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1",
           "TENSORWIRE_ASAN_FUZZ": "0"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                             "tests/integration/test_inference_native.py", "tests/integration/test_inference_swap.py",
                             "-k", "native and not address_sanitizer"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in result.stderr


# -- ModelStreamInfer, served natively ------------------------------------------

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def stream_messages() -> list[pb.ModelInferRequest]:
    """300 valid messages (more than the 256 a stream runs at once) with every kind of
    message the native side cannot serve itself interleaved."""
    rng = np.random.default_rng(5)
    x = np.ones((2, 2), np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor
    odd = [
        request(np.ones((1, 3), np.float32), id="shape"),
        pb.ModelInferRequest(model_name="nope", id="unknown"),
        request(x, id="version-x", model_version="x"),
        request(x, id="version-7", model_version="7"),
        request(x, id="version-1", model_version="1"),
        request(x, id="out-nope", outputs=[{"name": "nope"}]),
        request(x, id="out-logits", outputs=[{"name": "logits"}]),
        request(np.ones((9, 2), np.float32), id="rows"),  # over max_batch_size 8
        pb.ModelInferRequest(model_name="spiral", id="typed", inputs=[tensor(
            name="points", datatype="FP32", shape=[1, 2], contents=pb.InferTensorContents(fp32_contents=[1.0, 2.0]))]),
        pb.ModelInferRequest(model_name="spiral", id="dtype", raw_input_contents=[x.astype(np.float64).tobytes()],
                             inputs=[tensor(name="points", datatype="FP64", shape=[2, 2])]),
        pb.ModelInferRequest(model_name="spiral", id="short", raw_input_contents=[x.tobytes()[:-1]],
                             inputs=[tensor(name="points", datatype="FP32", shape=[2, 2])]),
        pb.ModelInferRequest(model_name="spiral", id="no-input"),
        request(x),  # no id
    ]
    valid = [request(rng.standard_normal((int(rng.integers(1, 4)), 2)).astype(np.float32), id=f"v{i}")
             for i in range(300)]
    messages = list(valid)
    for k, m in enumerate(odd):
        messages.insert(k * 23, m)
    return messages


def stream_answer(r: pb.ModelStreamInferResponse) -> tuple[bytes, dict[str, np.ndarray]]:
    """An answer's bytes without its output values, and the values (compared within
    float tolerance: the two servers batch differently)."""
    values = {} if r.error_message else oip.decode_outputs(r.infer_response)
    bare = pb.ModelStreamInferResponse()
    bare.CopyFrom(r)
    del bare.infer_response.raw_output_contents[:]
    for out in bare.infer_response.outputs:
        out.ClearField("contents")
    return bare.SerializeToString(), values


async def streamed(port: int, messages: list[bytes], hold: bool = False, **kw: object) -> tuple[list[bytes], str, str]:
    """Every answer's bytes, and the stream's final status and details (``hold``: the
    client does not half-close after its messages)."""
    answers: list[bytes] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(STREAM)(timeout=30, **kw)

        async def send() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):  # the server ended it
                for m in messages:
                    await call.write(m)
                if not hold:
                    await call.done_writing()

        writer = asyncio.ensure_future(send())
        try:
            while (answer := await call.read()) is not grpc.aio.EOF:
                answers.append(answer)
            await writer
        except grpc.aio.AioRpcError as exc:
            return answers, exc.code().name, exc.details() or ""
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
    return answers, "OK", ""


async def until_all_buried(app: InferenceApp) -> None:
    """Every call, stream and stream message of the native frontend has given back its
    references (is freed or in the graveyard)."""
    assert app.frontend is not None
    for _ in range(500):
        if app.frontend.stats()["unburied"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"native objects still referenced: {app.frontend.stats()}")


@needs_native
async def test_native_stream_answers_exactly_as_python_does(tmp_path: Path) -> None:
    """One stream -- 300 valid messages at once (past the 256 in flight), the bad, the
    unknown and the ones only Python serves among them -- answered by a Python and a
    native server: the same answers (by id: completion order may differ), the bad
    ones as the same error_message; a message that does not parse ends both streams
    with the same status. Statistics and metrics count the natively served ones."""
    repo = spiral_repo(tmp_path, max_queue_delay_us=1000)
    messages = stream_messages()
    bodies = [m.SerializeToString() for m in messages]
    labels = {"service": "inference", "method": "ModelStreamInfer", "code": "OK"}
    async with server_of(tmp_path, "python", repo) as (_, py_port), \
            server_of(tmp_path, "native", repo) as (app, native_port):
        assert app.frontend is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{native_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(100):  # the native side learns the model's rules (first requests: Python)
                await stub.ModelInfer(request(np.ones((1, 2), np.float32)), timeout=10)
                if app.frontend.stats()["native"]:
                    break
            stats0 = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="spiral"), timeout=10)).model_stats[0]
        base = app.frontend.stats()
        streams0 = REGISTRY.get_sample_value("tensorwire_rpc_handled_total", labels) or 0.0
        (theirs, code, _), (ours, native_code, _) = await asyncio.gather(
            streamed(py_port, bodies), streamed(native_port, bodies))
        assert code == native_code == "OK"
        assert len(theirs) == len(ours) == len(messages)
        expected = {pb.ModelStreamInferResponse.FromString(a).infer_response.id: stream_answer(
            pb.ModelStreamInferResponse.FromString(a)) for a in theirs}
        got = {pb.ModelStreamInferResponse.FromString(a).infer_response.id: stream_answer(
            pb.ModelStreamInferResponse.FromString(a)) for a in ours}
        assert got.keys() == expected.keys() and len(got) == len(messages)
        for key, (bare, values) in expected.items():
            assert got[key][0] == bare, key
            assert got[key][1].keys() == values.keys(), key
            for name, value in values.items():
                np.testing.assert_allclose(got[key][1][name], value, rtol=1e-5, atol=1e-6)
        errors = {k: pb.ModelStreamInferResponse.FromString(b).error_message for k, (b, _) in got.items()}
        assert errors["unknown"] == "NOT_FOUND: unknown model 'nope'"
        assert errors["shape"].startswith("INVALID_ARGUMENT: input 'points'")
        assert sum(bool(e) for e in errors.values()) == 9, errors  # typed, out-logits, version-1, no id: served
        now = app.frontend.stats()
        assert now["streams"] - base["streams"] == 1
        assert now["native"] - base["native"] >= 290, (base, now)  # the valid ones (a few may meet a re-read)
        assert now["proxied"] - base["proxied"] >= 9, (base, now)  # the odd ones, one unary call each
        async with grpc.aio.insecure_channel(f"127.0.0.1:{native_port}") as channel:
            stats = (await pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name="spiral"), timeout=10)).model_stats[0]
        rows = sum(m.inputs[0].shape[0] for m in messages if m.id[:1] == "v" and m.id[1:].isdigit())
        assert stats.inference_count - stats0.inference_count == rows + 2 + 2 + 1 + 2  # + version-1, out-logits, typed, no id
        assert stats.inference_stats.success.count - stats0.inference_stats.success.count == 304
        assert REGISTRY.get_sample_value("tensorwire_rpc_handled_total", labels) - streams0 == 2  # one per stream

        # A message that does not parse ends the stream, with Python's words, on both.
        valid = request(np.ones((1, 2), np.float32), id="a").SerializeToString()
        for body, hold in ((b"\xff\xff\xff", False), (valid[:-3], False), (b"\xff\xff\xff", True)):
            (_, code, details), (_, native_code, native_details) = await asyncio.gather(
                streamed(py_port, [valid, valid, body], hold), streamed(native_port, [valid, valid, body], hold))
            assert (native_code, native_details) == (code, details)
            assert code == "INVALID_ARGUMENT" and "not a valid inference.ModelInferRequest" in details, (code, details)
        # An empty stream, and the server still serves.
        assert await streamed(native_port, []) == await streamed(py_port, []) == ([], "OK", "")
        answers, code, _ = await streamed(native_port, [valid] * 3)
        assert code == "OK" and len(answers) == 3
        await until_all_buried(app)


@pytest.mark.parametrize("frontend", ["python", "native"])
async def test_stream_cancelled_mid_stream_releases_everything(frontend: str, tmp_path: Path) -> None:
    """The client cancels a stream while its messages are queued, in a running batch and
    forwarded to Python (the model held): the server lets go of all of them (the queue
    drains, the batch's answers are dropped) and serves the next stream; the same on
    both frontends."""
    if frontend == "native" and MODULE is None:
        pytest.skip(f"native frontend {WHY}")
    import threading

    async with server_of(tmp_path, frontend, spiral_repo(tmp_path, max_queue_delay_us=500)) as (app, port):
        version = app.repository.version_of("spiral", "1")
        gate = threading.Event()
        forward = version.forward_columns
        version.forward_columns = lambda *a: (gate.wait(30), forward(*a))[1]  # type: ignore[method-assign]
        x = np.ones((1, 2), np.float32)
        typed = pb.ModelInferRequest(model_name="spiral", id="typed", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="points", datatype="FP32", shape=[1, 2], contents=pb.InferTensorContents(fp32_contents=[1.0, 2.0]))])
        held = asyncio.Event()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def send() -> AsyncIterator[pb.ModelInferRequest]:
                yield pb.ModelInferRequest(model_name="nope", id="unknown")
                for i in range(40):
                    yield request(x, id=f"v{i}")
                yield typed
                await held.wait()  # no half-close: the client cancels

            call = stub.ModelStreamInfer(send(), timeout=30)
            first = await call.read()
            assert first.infer_response.id == "unknown" and first.error_message.startswith("NOT_FOUND")
            if app.frontend is not None:
                for _ in range(1000):
                    stats = app.frontend.stats()
                    if stats["running"] == 1 and stats["queued"] >= 1:
                        break
                    await asyncio.sleep(0.005)
                assert stats["running"] == 1 and stats["queued"] >= 1, stats
            else:
                await asyncio.sleep(0.3)
            call.cancel()
            held.set()
            await asyncio.sleep(0.1)
            gate.set()
            # The next stream on the same server: every answer.
            async def again() -> AsyncIterator[pb.ModelInferRequest]:
                for i in range(20):
                    yield request(x, id=f"w{i}")

            ids = sorted([r.infer_response.id async for r in stub.ModelStreamInfer(again(), timeout=30)
                          if not r.error_message])
            assert ids == sorted(f"w{i}" for i in range(20))
            if app.frontend is not None:
                for _ in range(500):
                    stats = app.frontend.stats()
                    if stats["queued"] == 0 and stats["running"] == 0:
                        break
                    await asyncio.sleep(0.01)
                assert stats["queued"] == 0 and stats["running"] == 0, stats
                assert stats["streams"] == 2
                await until_all_buried(app)


@needs_native
async def test_native_stream_roles_and_tokens(tmp_path: Path) -> None:
    """A stream is checked once, at its start, as Python's interceptor does: a refused
    token gets the same status from the native port; an accepted one is served natively."""
    authorizer = Authorizer(TokenFile(write_tokens(tmp_path / "tokens.csv")))
    body = request(np.ones((1, 2), np.float32), id="a").SerializeToString()
    async with server_of(tmp_path, "native", spiral_repo(tmp_path), authorizer=authorizer) as (app, port):
        answers, code, details = await streamed(port, [body], metadata=(("authorization", "Bearer wrong-token"),))
        assert (answers, code) == ([], "UNAUTHENTICATED") and "unknown bearer token" in details
        assert app.frontend is not None and app.frontend.stats()["streams"] == 0  # forwarded whole
        answers, code, _ = await streamed(port, [body] * 3, metadata=bearer("viewer"))
        assert code == "OK" and len(answers) == 3
        assert app.frontend.stats()["streams"] == 1


# -- stream failures: what ends a stream, and what it leaves behind --------------


def _rpc_samples(method: str) -> tuple[float, float]:
    """tensorwire_rpc_handled_total over every code, and the latency count, of one
    method of the inference service."""
    handled = sum(s.value for m in REGISTRY.collect() if m.name == "tensorwire_rpc_handled"
                  for s in m.samples if s.name == "tensorwire_rpc_handled_total"
                  and s.labels.get("service") == "inference" and s.labels.get("method") == method)
    latency = REGISTRY.get_sample_value("tensorwire_rpc_latency_seconds_count",
                                        {"service": "inference", "method": method}) or 0.0
    return handled, latency


async def _warm(app: InferenceApp, port: int) -> None:
    """Until the native side has learned the model's rules (a no-op on Python)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(100):
            await stub.ModelInfer(request(np.ones((1, 2), np.float32)), timeout=10)
            if app.frontend is None or app.frontend.stats()["native"]:
                return


def _skip_without_native(frontend: str) -> None:
    if frontend == "native" and MODULE is None:
        pytest.skip(f"native frontend {WHY}")


def _streamed_in_a_thread(port: int, messages: list[bytes], hold: bool) -> tuple[list[str], str]:
    """The ids answered on one stream and its final status, from a synchronous client
    (it runs while the test's event loop, the Python server's, is blocked)."""
    release = threading.Event()

    def send() -> Iterator[bytes]:
        yield from messages
        if hold:
            release.wait(30)

    ids: list[str] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(STREAM)(send(), timeout=30)
        try:
            for answer in call:
                ids.append(pb.ModelStreamInferResponse.FromString(answer).infer_response.id)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        finally:
            release.set()
    return ids, code


@pytest.mark.parametrize("frontend", ["python", "native"])
async def test_nothing_after_a_malformed_stream_message_is_answered(frontend: str, tmp_path: Path) -> None:
    """Python's stream reader aborts the stream at the message that does not parse:
    the messages after it are never read, so never answered, and nothing is written
    after it. The native frontend asked Python for the words and meanwhile read on
    and answered the later messages (seen here with the Python server's event loop
    blocked 0.4 s while a client thread sends: the native threads run on)."""
    _skip_without_native(frontend)
    x = np.ones((1, 2), np.float32)
    bad = b"\xff\xff\xff"
    before = [request(x, id=f"before{i}").SerializeToString() for i in range(3)]
    after = [request(x, id=f"after{i}").SerializeToString() for i in range(30)]
    async with server_of(tmp_path, frontend, spiral_repo(tmp_path, max_queue_delay_us=500)) as (app, port):
        await _warm(app, port)
        for messages, hold in (([bad, *after], False), ([*before, bad, *after], False), ([*before, bad, *after], True)):
            sent = asyncio.get_running_loop().run_in_executor(None, _streamed_in_a_thread, port, messages, hold)
            time.sleep(0.4)  # the Python server's verdict on the bad message waits
            ids, code = await sent
            assert code == "INVALID_ARGUMENT" and all(i.startswith("before") for i in ids), (code, ids)
        # The server serves the next stream in full.
        answers, code, _ = await streamed(port, after)
        assert code == "OK" and len(answers) == len(after)
        if app.frontend is not None:
            await until_all_buried(app)


@pytest.mark.parametrize("frontend", ["python", "native"])
async def test_a_stream_that_fails_drops_its_queued_work(frontend: str, tmp_path: Path) -> None:
    """A stream that ends by itself (here: a message that does not parse, while the
    model is held with a batch of it running and the rest queued) lets go of its
    queued messages: they never reach the model, and the batcher counts them as
    dropped (cancelled), as the Python frontend does when it cancels the stream's tasks."""
    _skip_without_native(frontend)

    async with server_of(tmp_path, frontend, spiral_repo(tmp_path, max_queue_delay_us=500)) as (app, port):
        await _warm(app, port)
        version = app.repository.version_of("spiral", "1")
        gate = threading.Event()
        ran: list[int] = []
        forward = version.forward_columns

        def held(columns: list[np.ndarray], requests: int) -> list[np.ndarray]:
            ran.append(requests)
            gate.wait(30)
            return forward(columns, requests)

        version.forward_columns = held  # type: ignore[method-assign]
        dropped0 = version.batcher.metrics.dropped_cancelled
        x = np.ones((1, 2), np.float32)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(STREAM)(timeout=30)
            for i in range(40):
                await call.write(request(x, id=f"v{i}").SerializeToString())
            # One batch running (held), the rest queued.
            for _ in range(1000):
                queued = app.frontend.stats()["queued"] if app.frontend is not None else version.batcher.queue_depth
                if ran and queued >= 20:
                    break
                await asyncio.sleep(0.005)
            assert len(ran) == 1 and queued >= 20, (ran, queued)
            await call.write(b"\xff\xff\xff")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await asyncio.sleep(0.2)  # the server's side of the end settles first
        gate.set()
        for _ in range(500):
            queued = app.frontend.stats()["queued"] if app.frontend is not None else version.batcher.queue_depth
            if queued == 0 and version.batcher.metrics.dropped_cancelled - dropped0 >= 40 - sum(ran):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert len(ran) == 1, ran  # only the batch that was running when the stream ended
        assert version.batcher.metrics.dropped_cancelled - dropped0 == 40 - ran[0]
        if app.frontend is not None:
            assert app.frontend.stats()["cancelled"] >= 40 - ran[0]
            await until_all_buried(app)


@pytest.mark.parametrize("frontend", ["python", "native"])
async def test_forwarded_stream_messages_count_as_the_stream(frontend: str, tmp_path: Path) -> None:
    """The RPC metrics count a stream once, as ModelStreamInfer, whatever its messages:
    the native frontend's forwards of the messages it cannot serve itself (typed
    contents, bad input, an unknown model) are not ModelInfer calls in them."""
    _skip_without_native(frontend)
    x = np.ones((1, 2), np.float32)
    odd = [m.SerializeToString() for m in stream_messages()[:13 * 23:23]]  # the 13 odd ones
    valid = [request(x, id=f"v{i}").SerializeToString() for i in range(5)]
    async with server_of(tmp_path, frontend, spiral_repo(tmp_path)) as (app, port):
        await _warm(app, port)
        infer0, stream0 = _rpc_samples("ModelInfer"), _rpc_samples("ModelStreamInfer")
        proxied0 = app.frontend.stats()["proxied"] if app.frontend is not None else 0
        answers, code, _ = await streamed(port, [*odd, *valid])
        assert code == "OK" and len(answers) == len(odd) + len(valid)
        for _ in range(100):  # the stream's metrics are recorded as it ends
            if _rpc_samples("ModelStreamInfer") != stream0:
                break
            await asyncio.sleep(0.01)
        assert _rpc_samples("ModelInfer") == infer0
        assert _rpc_samples("ModelStreamInfer") == (stream0[0] + 1, stream0[1] + 1)
        if app.frontend is not None:
            assert app.frontend.stats()["proxied"] - proxied0 >= 9  # they did go to Python
