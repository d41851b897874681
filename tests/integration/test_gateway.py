"""The web gateway on a real socket, in front of the real trainer and streamer.

gRPC-Web in binary and text modes, errors as gRPC statuses, routing, a live
stream relayed frame by frame, the upstream call cancelled when the browser goes
away, CORS, health, and the static app.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY

from services.gateway.app import Gateway
from services.gateway.settings import GatewaySettings
from services.streamer.app import create_app as create_streamer
from services.streamer.settings import StreamerSettings
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tensorwire.streamer.v1 import streamer_pb2
from tensorwire.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import free_port, serving, settings_for

TRAINER = "/tensorwire.trainer.v1.TrainerService"
STREAMER = "/tensorwire.streamer.v1.StreamerService"
BINARY = {"Content-Type": "application/grpc-web+proto", "X-Grpc-Web": "1"}
TEXT = {"Content-Type": "application/grpc-web-text", "X-Grpc-Web": "1"}


@dataclasses.dataclass
class Suite:
    url: str
    trainer_port: int
    streamer_port: int
    gateway: Gateway
    http: aiohttp.ClientSession


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    streamer = await create_streamer(settings_for(StreamerSettings, tmp_path, keepalive_s=0.1))
    async with serving(streamer, "streamer") as st:
        trainer = await create_trainer(settings_for(
            TrainerSettings, tmp_path, streamer_target=f"127.0.0.1:{st.port}", inference_target="",
            demo_task="", demo_models=False,
        ))
        async with serving(trainer, "trainer") as tr:
            static = tmp_path / "dist"
            (static / "assets").mkdir(parents=True)
            (static / "index.html").write_text("<!doctype html><title>tensorwire</title>")
            (static / "assets" / "app-X.js").write_text("console.log('x')")
            settings = GatewaySettings(
                host="127.0.0.1", port=0, trainer_target=f"127.0.0.1:{tr.port}",
                streamer_target=f"127.0.0.1:{st.port}", inference_target=f"127.0.0.1:{free_port()}",
                static_dir=static, cors_origins=("http://allowed.example",), grace_s=1.0,
            )
            gateway = Gateway(settings)
            port = await gateway.start()
            try:
                async with aiohttp.ClientSession() as http:
                    yield Suite(f"http://127.0.0.1:{port}", tr.port, st.port, gateway, http)
            finally:
                await gateway.aclose()


def framed(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def parse_frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, offset = [], 0
    while offset < len(body):
        flag, length = struct.unpack_from(">BI", body, offset)
        frames.append((flag, body[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    return frames


def trailers(block: bytes) -> dict[str, str]:
    lines = block.decode().strip().split("\r\n")
    return dict(line.split(":", 1) for line in lines)


async def direct_tasks(port: int) -> trainer_pb2.ListTasksResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        return await trainer_pb2_grpc.TrainerServiceStub(ch).ListTasks(trainer_pb2.ListTasksRequest())


async def test_unary_binary_mode_matches_a_direct_call(suite: Suite) -> None:
    body = framed(trainer_pb2.ListTasksRequest().SerializeToString())
    async with suite.http.post(f"{suite.url}{TRAINER}/ListTasks", data=body, headers=BINARY) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/grpc-web+proto"
        frames = parse_frames(await r.read())
    (flag, message), (tflag, block) = frames
    assert (flag, tflag) == (0x00, 0x80)
    assert trailers(block)["grpc-status"] == "0"
    reply = trainer_pb2.ListTasksResponse.FromString(message)
    assert reply == await direct_tasks(suite.trainer_port)
    assert {t.name for t in reply.tasks} >= {"spiral", "trajectory"}


async def test_unary_text_mode(suite: Suite) -> None:
    body = base64.b64encode(framed(trainer_pb2.ListTasksRequest().SerializeToString()))
    async with suite.http.post(f"{suite.url}{TRAINER}/ListTasks", data=body, headers=TEXT) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/grpc-web-text+proto"
        raw = await r.read()
    # Each frame is its own padded base64 chunk: decode 4 characters at a time.
    decoded = b"".join(base64.b64decode(raw[i : i + 4]) for i in range(0, len(raw), 4))
    (_, message), (_, block) = parse_frames(decoded)
    assert trailers(block)["grpc-status"] == "0"
    assert trainer_pb2.ListTasksResponse.FromString(message) == await direct_tasks(suite.trainer_port)


async def test_start_control_and_errors_as_grpc_status(suite: Suite) -> None:
    start = trainer_pb2.StartRunRequest(task="spiral", seed=1).SerializeToString()
    async with suite.http.post(f"{suite.url}{TRAINER}/StartRun", data=framed(start), headers=BINARY) as r:
        (_, message), (_, block) = parse_frames(await r.read())
    assert trailers(block)["grpc-status"] == "0"
    run = trainer_pb2.StartRunResponse.FromString(message).run
    assert run.task == "spiral" and run.run_id
    stop = trainer_pb2.StopRunRequest(run_id=run.run_id).SerializeToString()
    async with suite.http.post(f"{suite.url}{TRAINER}/StopRun", data=framed(stop), headers=BINARY) as r:
        assert trailers(parse_frames(await r.read())[-1][1])["grpc-status"] == "0"

    missing = trainer_pb2.GetRunRequest(run_id="no-such-run").SerializeToString()
    async with suite.http.post(f"{suite.url}{TRAINER}/GetRun", data=framed(missing), headers=BINARY) as r:
        # Trailers-only: the status travels in the HTTP headers, the body is empty.
        assert r.status == 200
        assert r.headers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
        assert "no-such-run" in r.headers["grpc-message"]
        assert await r.read() == b""


@pytest.mark.parametrize(
    ("path", "body", "code", "words"),
    [
        (f"{TRAINER}/ListTasks", b"\x00\x00\x00\x00\x09abc", "INVALID_ARGUMENT", "announces 9 bytes"),
        (f"{TRAINER}/ListTasks", b"", "INVALID_ARGUMENT", "exactly one message"),
        ("/no.such.Service/Call", framed(b""), "UNIMPLEMENTED", "not routed"),
        (f"{TRAINER}/NoSuchMethod", framed(b""), "UNIMPLEMENTED", "not available over gRPC-Web"),
        (f"{STREAMER}/Publish", framed(b""), "UNIMPLEMENTED", "client-streaming"),
    ],
)
async def test_bad_calls_get_precise_statuses(suite: Suite, path: str, body: bytes, code: str, words: str) -> None:
    async with suite.http.post(f"{suite.url}{path}", data=body, headers=BINARY) as r:
        assert r.status == 200
        assert r.headers["grpc-status"] == str(grpc.StatusCode[code].value[0])
        assert words in r.headers["grpc-message"]


async def test_unreachable_upstream_is_unavailable(suite: Suite) -> None:
    body = framed(b"")
    async with suite.http.post(f"{suite.url}/inference.GRPCInferenceService/ServerLive",
                               data=body, headers=BINARY) as r:
        assert r.headers["grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0])


async def test_not_grpc_web_is_415(suite: Suite) -> None:
    async with suite.http.post(f"{suite.url}{TRAINER}/ListTasks", data=b"{}",
                               headers={"Content-Type": "application/json"}) as r:
        assert r.status == 415


def _ended(method: str) -> float:
    """Calls of a streamer method that have ended, whatever their status."""
    return sum(s.value for s in _samples()
               if s.name.endswith("_total") and s.labels["method"] == method)


def _samples() -> list[object]:
    return [s for m in REGISTRY.collect() if m.name == "tensorwire_rpc_handled"
            for s in m.samples if s.labels.get("service") == "streamer"]


async def _read_frame(response: aiohttp.ClientResponse, buffer: bytearray) -> tuple[int, bytes]:
    while True:
        if len(buffer) >= 5:
            flag, length = struct.unpack_from(">BI", buffer, 0)
            if len(buffer) >= 5 + length:
                payload = bytes(buffer[5 : 5 + length])
                del buffer[: 5 + length]
                return flag, payload
        chunk = await asyncio.wait_for(response.content.readany(), 10)
        assert chunk, "the stream ended early"
        buffer.extend(chunk)


async def test_stream_relayed_frame_by_frame_and_cancelled_with_the_browser(suite: Suite) -> None:
    start = trainer_pb2.StartRunRequest(task="spiral", seed=2).SerializeToString()
    async with suite.http.post(f"{suite.url}{TRAINER}/StartRun", data=framed(start), headers=BINARY) as r:
        run = trainer_pb2.StartRunResponse.FromString(parse_frames(await r.read())[0][1]).run
    ended_before = _ended("Subscribe")
    request = streamer_pb2.SubscribeRequest(run_id=run.run_id).SerializeToString()
    response = await suite.http.post(f"{suite.url}{STREAMER}/Subscribe", data=framed(request), headers=BINARY)
    buffer = bytearray()
    steps, arrivals = [], []
    try:
        assert response.status == 200
        # Frames arrive one by one while the stream stays open (a buffering proxy
        # would deliver nothing until the end, which never comes).
        while len(arrivals) < 6:
            flag, payload = await _read_frame(response, buffer)
            assert flag == 0, f"stream ended: {payload!r}"
            frame = streamer_pb2.Frame.FromString(payload)
            steps.append(frame.step)
            arrivals.append(time.monotonic())
        assert len(set(steps)) > 1 and max(steps) > 0, f"the run's step did not advance: {steps}"
    finally:
        response.close()  # the browser goes away
    # The streamer's Subscribe, which never ends by itself, ends now (its RPC
    # metric counts it).
    deadline = time.monotonic() + 10
    while _ended("Subscribe") <= ended_before:
        assert time.monotonic() < deadline, f"the upstream Subscribe was not cancelled: {_samples()}"
        await asyncio.sleep(0.02)
    async with suite.http.get(f"{suite.url}/metrics") as r:
        assert "tensorwire_gateway_streams_active 0.0" in await r.text()


async def test_cors_allow_list(suite: Suite) -> None:
    url = f"{suite.url}{TRAINER}/ListTasks"
    preflight = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,x-grpc-web,x-user-agent"}
    async with suite.http.options(url, headers=preflight) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "http://allowed.example"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "x-grpc-web" in r.headers["Access-Control-Allow-Headers"]
    async with suite.http.options(url, headers={**preflight, "Origin": "http://evil.example"}) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
    body = framed(trainer_pb2.ListTasksRequest().SerializeToString())
    async with suite.http.post(url, data=body, headers={**BINARY, "Origin": "http://allowed.example"}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "http://allowed.example"
        assert "grpc-status" in r.headers["Access-Control-Expose-Headers"]
        assert "grpc-message" in r.headers["Access-Control-Expose-Headers"]
    async with suite.http.post(url, data=body, headers={**BINARY, "Origin": "http://evil.example"}) as r:
        assert r.status == 403
    # The page's own origin needs no allow-list entry.
    async with suite.http.post(url, data=body, headers={**BINARY, "Origin": suite.url}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == suite.url


async def test_health_and_readiness(suite: Suite) -> None:
    async with suite.http.get(f"{suite.url}/healthz") as r:
        assert r.status == 200
    async with suite.http.get(f"{suite.url}/readyz") as r:
        # Inference points at a port nobody listens on.
        assert r.status == 503
        body = await r.json()
    assert body["upstreams"]["tensorwire.trainer.v1.TrainerService"] == "SERVING"
    assert body["upstreams"]["tensorwire.streamer.v1.StreamerService"] == "SERVING"
    assert body["upstreams"]["inference.GRPCInferenceService"].startswith("UNREACHABLE")


async def test_static_app(suite: Suite, tmp_path: Path) -> None:
    async with suite.http.get(f"{suite.url}/") as r:
        assert r.status == 200 and "<title>tensorwire</title>" in await r.text()
        assert r.headers["Cache-Control"] == "no-cache"
    async with suite.http.get(f"{suite.url}/assets/app-X.js") as r:
        assert r.status == 200 and "immutable" in r.headers["Cache-Control"]
    async with suite.http.get(f"{suite.url}/assets/..%2Findex.html") as r:
        assert r.status == 404
    (tmp_path / "dist" / "index.html").unlink()
    async with suite.http.get(f"{suite.url}/") as r:
        assert r.status == 503 and "make web" in await r.text()
