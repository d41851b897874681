"""The foundation: every service starts on port 0 and answers health, reflection
(the way grpcurl uses it), unknown methods, malformed requests and shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.inference.app import create_app as create_inference
from services.inference.settings import InferenceSettings
from services.streamer.app import create_app as create_streamer
from services.streamer.settings import StreamerSettings
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tests.conftest import free_port, serving, settings_for
from tests.support.grpcurl import Grpcurl

ROOT = Path(__file__).resolve().parents[2]

SERVICES = {
    "trainer": (create_trainer, TrainerSettings, "tensorwire.trainer.v1.TrainerService",
                "ListTasks", "{}"),
    "streamer": (create_streamer, StreamerSettings, "tensorwire.streamer.v1.StreamerService",
                 "Subscribe", None),
    "inference": (create_inference, InferenceSettings, "inference.GRPCInferenceService",
                  "ServerMetadata", "{}"),
}


async def _health(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return reply.status


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_health_and_reflection(name: str, tmp_path: Path) -> None:
    factory, settings_cls, full_name, method, body = SERVICES[name]
    app = await factory(settings_for(settings_cls, tmp_path))
    async with serving(app, name) as server:
        assert await _health(server.port) == health_pb2.HealthCheckResponse.SERVING
        assert await _health(server.port, full_name) == health_pb2.HealthCheckResponse.SERVING
        curl = Grpcurl(f"127.0.0.1:{server.port}")
        try:
            listed = await asyncio.to_thread(curl.list)
            assert full_name in listed
            assert "grpc.health.v1.Health" in listed
            assert "grpc.reflection.v1alpha.ServerReflection" in listed
            desc = await asyncio.to_thread(curl.describe, f"{full_name}.{method}")
            assert desc.name == method
            assert desc.input_type.fields is not None
            if body is not None:
                reply = await asyncio.to_thread(curl.call, f"{full_name}/{method}", body)
                assert isinstance(reply, dict)
        finally:
            curl.close()


async def test_inference_metadata_via_json(tmp_path: Path) -> None:
    app = await create_inference(settings_for(InferenceSettings, tmp_path))
    async with serving(app, "inference") as server:
        curl = Grpcurl(f"127.0.0.1:{server.port}")
        try:
            reply = await asyncio.to_thread(
                curl.call, "inference.GRPCInferenceService/ServerMetadata", "{}"
            )
            assert reply["name"] == "tensorwire"
            live = await asyncio.to_thread(curl.call, "inference.GRPCInferenceService/ServerLive", "{}")
            assert live == {"live": True}
        finally:
            curl.close()


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_unknown_method_and_malformed_request(name: str, tmp_path: Path) -> None:
    factory, settings_cls, full_name, method, _ = SERVICES[name]
    app = await factory(settings_for(settings_cls, tmp_path))
    async with serving(app, name) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            unknown = ch.unary_unary(f"/{full_name}/NoSuchMethod")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unknown(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

            # Field 1 claims 100 bytes of length-delimited data, then the bytes end.
            garbage = b"\x0a\x64abc"
            if method == "Subscribe":
                call = ch.unary_stream(f"/{full_name}/{method}")(garbage, timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary(f"/{full_name}/{method}")(garbage, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid" in err.value.details()
        assert await _health(server.port) == health_pb2.HealthCheckResponse.SERVING


def test_settings_name_the_bad_value() -> None:
    from tensorwire.rpc.config import SettingsError, load

    with pytest.raises(SettingsError, match=r"port \(--port\) must be <= 65535, got 70000"):
        load(TrainerSettings, ["--port", "70000"], env={})
    with pytest.raises(SettingsError, match=r"TENSORWIRE_STREAMER_GRACE_S.*'soon'"):
        load(StreamerSettings, [], env={"TENSORWIRE_STREAMER_GRACE_S": "soon"})
    settings = load(InferenceSettings, [], env={"TENSORWIRE_INFERENCE_PORT": "9001"})
    assert settings.port == 9001
    assert load(InferenceSettings, ["--port", "9002"], env={"TENSORWIRE_INFERENCE_PORT": "9001"}).port == 9002


def test_service_process_drains_and_exits_zero(tmp_path: Path) -> None:
    """SIGTERM: an in-flight stream gets its end, health turns NOT_SERVING, exit 0."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.streamer", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "-1", "--grace-s", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        from tensorwire.streamer.v1 import streamer_pb2, streamer_pb2_grpc

        frames = streamer_pb2_grpc.StreamerServiceStub(channel).Subscribe(
            streamer_pb2.SubscribeRequest(run_id="nothing-yet"), timeout=30
        )
        next(frames)  # the stream is live
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        remaining = list(frames)  # ends cleanly (OK), not cut off
        assert all(f.WhichOneof("body") == "status" for f in remaining)
        assert proc.wait(timeout=20) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "stopped" in out


def _suite_pids(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and "services." in cmdline:
            pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_tensorwire_up_serves_all_and_leaves_nothing(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("trainer", "streamer", "inference", "web")}
    env = {
        **os.environ,
        "TENSORWIRE_TRAINER_PORT": str(ports["trainer"]),
        "TENSORWIRE_STREAMER_PORT": str(ports["streamer"]),
        "TENSORWIRE_INFERENCE_PORT": str(ports["inference"]),
        "TENSORWIRE_WEB_PORT": str(ports["web"]),
        "TENSORWIRE_UP_TEST_DIR": str(tmp_path),
    }
    started = time.monotonic()
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwire.cli", "up", "--no-metrics",
         "--data-dir", str(tmp_path)],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
    )
    try:
        for port in (ports["trainer"], ports["streamer"], ports["inference"]):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(channel).result(timeout=60)
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            channel.close()
        assert time.monotonic() - started < 60
        while "all services SERVING" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() - started < 90, log.read_text()
            time.sleep(0.1)
        marker = str(ports["streamer"])
        assert _suite_pids(marker), "suite processes should be running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while _suite_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _suite_pids(marker) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert "all services SERVING" in out, out
    assert f"#token={(tmp_path / 'admin.token').read_text().strip()}" in out, out


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
