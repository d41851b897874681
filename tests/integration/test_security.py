"""Security on real servers and sockets: tokens with roles on every method of every
service, TLS with rotation and mTLS, safe defaults, and the attacks found by trying
the suite as an attacker would (each test is named after what it stops)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from services.inference.app import create_app as create_inference
from services.inference.settings import InferenceSettings
from services.streamer.app import create_app as create_streamer
from services.streamer.settings import StreamerSettings
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.inference import grpc_service_pb2 as ipb
from tensorwire.rpc import auth, config
from tensorwire.rpc.auth import METHOD_ROLES, Authorizer, Role, TokenFile
from tensorwire.rpc.server import GrpcServer, ServerOptions
from tensorwire.rpc.tls import ServerTls
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.streamer.v1 import streamer_pb2_grpc as spb_grpc
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc
from tensorwire.transfer.v1 import transfer_pb2
from tests.conftest import free_port, serving, settings_for
from tests.support.certs import Authority
from tests.support.grpcurl import Grpcurl

ROOT = Path(__file__).resolve().parents[2]

IDENTITIES = {
    "viewer": "tensorwire:viewer",
    "operator": "tensorwire:operator",
    "admin": "tensorwire:admin",
    "publisher": "tensorwire:publisher",
}
TOKENS = {name: f"tok-{name}-0123456789" for name in IDENTITIES}


def write_tokens(path: Path, extra: str = "") -> Path:
    lines = [f'{TOKENS[name]},{name},uid-{name},"{group}"' for name, group in IDENTITIES.items()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def bearer(name: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),) if name else ()


SERVICE_MODULES = (tpb, spb, ipb, transfer_pb2, health_pb2, reflection_pb2)


def every_method() -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every method of every service."""
    out = []
    for module in SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out.append((f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return out


def test_every_method_of_every_service_has_a_role() -> None:
    missing = [path for path, _, _ in every_method() if path not in METHOD_ROLES]
    assert not missing, f"methods without a role in tensorwire.rpc.auth.METHOD_ROLES: {missing}"
    # Only health checks (and Triton's liveness/readiness) are open.
    open_methods = sorted(p for p, role in METHOD_ROLES.items() if role is None)
    assert all(p.startswith(("/grpc.health.v1.", "/inference.GRPCInferenceService/Server"))
               for p in open_methods), open_methods


def test_a_method_missing_from_the_table_is_refused(tmp_path: Path) -> None:
    authorizer = Authorizer(TokenFile(write_tokens(tmp_path / "t.csv")))
    with pytest.raises(auth.PermissionDeniedError, match="not in the role table"):
        authorizer.check("/x.NewService/Shiny", bearer("admin"))


@dataclasses.dataclass
class Suite:
    ports: dict[str, int]
    tokens: Path


@contextlib.asynccontextmanager
async def secured_suite(tmp_path: Path) -> AsyncIterator[Suite]:
    tokens = write_tokens(tmp_path / "tokens.csv")
    authorizer = Authorizer(TokenFile(tokens))
    own_token = tmp_path / "trainer.token"
    own_token.write_text(TOKENS["publisher"] + "\n")
    streamer = await create_streamer(settings_for(StreamerSettings, tmp_path, keepalive_s=0.1))
    async with serving(streamer, "streamer", authorizer=authorizer) as st:
        inference = await create_inference(settings_for(InferenceSettings, tmp_path))
        async with serving(inference, "inference", authorizer=authorizer) as inf:
            trainer = await create_trainer(settings_for(
                TrainerSettings, tmp_path, streamer_target=f"127.0.0.1:{st.port}",
                inference_target="", demo_task="", demo_models=False, token_file=str(own_token),
            ))
            async with serving(trainer, "trainer", authorizer=authorizer) as tr:
                yield Suite({"trainer": tr.port, "streamer": st.port, "inference": inf.port}, tokens)


def _port_for(path: str, ports: dict[str, int]) -> int:
    if path.startswith("/tensorwire.trainer."):
        return ports["trainer"]
    if path.startswith("/tensorwire.streamer."):
        return ports["streamer"]
    return ports["inference"]


async def _status(channel: grpc.aio.Channel, path: str, client_streaming: bool,
                  server_streaming: bool, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """The status of one call with an empty request (b'' parses as any message)."""
    try:
        if not client_streaming and not server_streaming:
            await channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
        elif not client_streaming:
            call = channel.unary_stream(path)(b"", metadata=metadata, timeout=1.5)
            async for _ in call:
                break
            call.cancel()
        elif not server_streaming:
            await channel.stream_unary(path)(iter(()), metadata=metadata, timeout=5)
        else:
            call = channel.stream_stream(path)(iter(()), metadata=metadata, timeout=1.5)
            async for _ in call:
                break
            call.cancel()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_every_method_times_every_identity_gets_the_expected_status(tmp_path: Path) -> None:
    async with secured_suite(tmp_path) as suite:
        channels = {p: grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in suite.ports.values()}
        wrong: list[str] = []
        checked = 0
        try:
            for path, cs, ss in every_method():
                role = METHOD_ROLES[path]
                for who in (None, *IDENTITIES):
                    port = _port_for(path, suite.ports)
                    if path.startswith(("/grpc.health", "/grpc.reflection")):
                        ports = suite.ports.values()  # every server has them
                    else:
                        ports = [port]
                    for p in ports:
                        code = await _status(channels[p], path, cs, ss, bearer(who))
                        checked += 1
                        if role is None or (who and role in _roles(who)):
                            ok = code not in (grpc.StatusCode.UNAUTHENTICATED,
                                              grpc.StatusCode.PERMISSION_DENIED)
                        elif who is None:
                            ok = code == grpc.StatusCode.UNAUTHENTICATED
                        else:
                            ok = code == grpc.StatusCode.PERMISSION_DENIED
                        if not ok:
                            wrong.append(f"{path} as {who or 'nobody'} on :{p} -> {code.name}")
        finally:
            for channel in channels.values():
                await channel.close()
        assert checked > 100
        assert not wrong, "\n".join(wrong)


def _roles(who: str) -> frozenset[Role]:
    return auth.Identity(who, who, frozenset({IDENTITIES[who]})).roles


async def test_anonymous_caller_cannot_start_a_run(tmp_path: Path) -> None:
    async with secured_suite(tmp_path) as suite:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['trainer']}") as ch:
            stub = tpb_grpc.TrainerServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.StartRun(tpb.StartRunRequest(task="spiral"), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.StartRun(tpb.StartRunRequest(task="spiral"), timeout=5,
                                    metadata=(("authorization", "Bearer forged"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # The one way in: a token with the operator role.
            run = (await stub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 5}),
                                       timeout=10, metadata=bearer("operator"))).run
            assert run.run_id


async def test_viewer_cannot_unload_models_and_is_told_the_role(tmp_path: Path) -> None:
    async with secured_suite(tmp_path) as suite:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['inference']}") as ch:
            unload = ch.unary_unary("/inference.GRPCInferenceService/RepositoryModelUnload",
                                    request_serializer=ipb.RepositoryModelUnloadRequest.SerializeToString)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unload(ipb.RepositoryModelUnloadRequest(model_name="spiral"), timeout=5,
                             metadata=bearer("viewer"))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "RepositoryModelUnload" in err.value.details()
            assert "admin" in err.value.details()


async def test_spoofed_publish_never_reaches_viewers(tmp_path: Path) -> None:
    """Anyone could Publish status frames and a loss of 1e30 into a run's history."""
    async with secured_suite(tmp_path) as suite:
        target = f"127.0.0.1:{suite.ports['streamer']}"
        async with grpc.aio.insecure_channel(target) as ch:
            stub = spb_grpc.StreamerServiceStub(ch)
            spoof = spb.PublishRequest(status=cpb.RunStatus(run_id="victim", step=10**9,
                                                            metrics={"loss": 1e30}))
            for who in (None, "viewer", "operator", "admin"):
                call = stub.Publish(metadata=bearer(who), timeout=5)
                # The refusal comes before any message is read; written meanwhile, a message
                # can fail in grpc's client core, which then reports its own INTERNAL instead
                # of the server's status (CI, once): the spoof is written after the answer.
                await call.initial_metadata()
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.write(spoof)
                    await call.done_writing()
                assert await call.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                             grpc.StatusCode.PERMISSION_DENIED), who
            # A viewer of the run never sees the spoofed step.
            sub = stub.Subscribe(spb.SubscribeRequest(run_id="victim"), metadata=bearer("viewer"),
                                 timeout=1.0)
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for frame in sub:
                    assert frame.status.step != 10**9
                    assert frame.status.metrics.get("loss") != 1e30


async def test_the_trainer_publishes_with_its_own_token(tmp_path: Path) -> None:
    async with secured_suite(tmp_path) as suite:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['trainer']}") as ch:
            run = (await tpb_grpc.TrainerServiceStub(ch).StartRun(
                tpb.StartRunRequest(task="spiral"), timeout=10, metadata=bearer("operator"))).run
        async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['streamer']}") as ch:
            sub = spb_grpc.StreamerServiceStub(ch).Subscribe(
                spb.SubscribeRequest(run_id=run.run_id), metadata=bearer("viewer"), timeout=20)
            async for frame in sub:
                if frame.HasField("status") and frame.status.step > 0:
                    break
            sub.cancel()


async def test_reflection_needs_a_token_and_health_does_not(tmp_path: Path) -> None:
    async with secured_suite(tmp_path) as suite:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{suite.ports['trainer']}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        target = f"127.0.0.1:{suite.ports['trainer']}"

        def grpcurl_list(headers: tuple[tuple[str, str], ...]) -> list[str]:
            tool = Grpcurl(target, headers)  # `grpcurl -H 'authorization: Bearer ...' list`
            try:
                return tool.list()
            finally:
                tool.close()

        names = await asyncio.to_thread(grpcurl_list, bearer("viewer"))
        assert "tensorwire.trainer.v1.TrainerService" in names
        with pytest.raises(grpc.RpcError) as err:
            await asyncio.to_thread(grpcurl_list, ())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_token_file_changes_apply_without_restart(tmp_path: Path) -> None:
    now = [0.0]
    path = write_tokens(tmp_path / "t.csv")
    tokens = TokenFile(path, check_interval_s=1.0, clock=lambda: now[0])
    authorizer = Authorizer(tokens)
    method = "/tensorwire.trainer.v1.TrainerService/StartRun"
    assert authorizer.check(method, bearer("operator")).user == "operator"
    path.write_text('rotated-token,ops,9,"tensorwire:operator"\n')
    os.utime(path, ns=(1, 1))  # a different stamp even within one mtime tick
    now[0] = 2.0
    with pytest.raises(auth.UnauthenticatedError):
        authorizer.check(method, bearer("operator"))
    assert authorizer.check(method, (("authorization", "Bearer rotated-token"),)).user == "ops"
    # A broken file keeps the last good table.
    path.write_text("only-one-column\n")
    now[0] = 4.0
    assert authorizer.check(method, (("authorization", "Bearer rotated-token"),)).user == "ops"


def test_token_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('good,u,1,"tensorwire:viewer"\nbroken\n')
    with pytest.raises(auth.TokenFileError, match="line 2"):
        TokenFile(path)
    with pytest.raises(config.SettingsError, match="--auth-token-file"):
        config.load(StreamerSettings, ["--auth-token-file", str(tmp_path / "missing.csv")]).authorizer()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_refuses_to_listen_beyond_loopback_without_auth(host: str, tmp_path: Path) -> None:
    with pytest.raises(config.SettingsError, match="--auth-token-file"):
        config.load(StreamerSettings, ["--host", host], env={})
    assert config.load(StreamerSettings, ["--host", host, "--insecure"], env={}).insecure
    tokens = write_tokens(tmp_path / "t.csv")
    assert config.load(StreamerSettings, ["--host", host, "--auth-token-file", str(tokens)], env={})
    # Loopback needs neither (the local demo and the tests).
    assert config.load(StreamerSettings, [], env={}).host == "127.0.0.1"


def test_admin_token_is_private_and_stable(tmp_path: Path) -> None:
    token, table = auth.ensure_admin_token(tmp_path)
    assert (tmp_path / "admin.token").stat().st_mode & 0o777 == 0o600
    assert table.stat().st_mode & 0o777 == 0o600
    assert len(token) >= 32
    again, _ = auth.ensure_admin_token(tmp_path)
    assert again == token
    identity = TokenFile(table).lookup(token)
    assert identity is not None and identity.may(Role.ADMIN) and identity.may(Role.PUBLISHER)


# ------------------------------------------------------------------------ TLS


async def _health(target: str, credentials: grpc.ChannelCredentials | None) -> str:
    channel = (grpc.aio.secure_channel(target, credentials) if credentials
               else grpc.aio.insecure_channel(target))
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


async def test_tls_serves_verified_clients_and_follows_rotation(tmp_path: Path) -> None:
    first, second = Authority("first", tmp_path / "a"), Authority("second", tmp_path / "b")
    cert, key = first.issue("streamer")
    tls = ServerTls(cert, key)
    app = await create_streamer(settings_for(StreamerSettings, tmp_path))
    server = GrpcServer(ServerOptions(name="streamer", host="127.0.0.1", port=0, tls=tls), app)
    port = await server.start()
    target = f"localhost:{port}"
    try:
        trusts_first = grpc.ssl_channel_credentials(first.ca_path.read_bytes())
        trusts_second = grpc.ssl_channel_credentials(second.ca_path.read_bytes())
        assert await _health(target, trusts_first) == "SERVING"
        assert await _health(target, None) == "UNAVAILABLE"  # plaintext gets nowhere
        assert await _health(target, trusts_second) == "UNAVAILABLE"
        # cert-manager renews in place: new connections get the new certificate.
        second.issue("streamer", into=(cert, key))
        assert await _health(target, trusts_second) == "SERVING"
        assert tls.reloads == 1
    finally:
        await server.stop(0.2)


async def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path: Path) -> None:
    ca = Authority("ca", tmp_path)
    cert, key = ca.issue("server")
    client_cert, client_key = ca.issue("client", server=False)
    app = await create_streamer(settings_for(StreamerSettings, tmp_path))
    server = GrpcServer(ServerOptions(name="streamer", host="127.0.0.1", port=0,
                                      tls=ServerTls(cert, key, ca.ca_path)), app)
    port = await server.start()
    try:
        root = ca.ca_path.read_bytes()
        anonymous = grpc.ssl_channel_credentials(root)
        known = grpc.ssl_channel_credentials(root, client_key.read_bytes(), client_cert.read_bytes())
        assert await _health(f"localhost:{port}", anonymous) == "UNAVAILABLE"
        assert await _health(f"localhost:{port}", known) == "SERVING"
    finally:
        await server.stop(0.2)


async def test_trainer_publishes_over_tls_with_a_token(tmp_path: Path) -> None:
    """The client side: --tls-ca and --token-file on a service reach the pool."""
    ca = Authority("ca", tmp_path)
    cert, key = ca.issue("streamer")
    tokens = write_tokens(tmp_path / "tokens.csv")
    streamer = await create_streamer(settings_for(StreamerSettings, tmp_path))
    server = GrpcServer(ServerOptions(name="streamer", host="127.0.0.1", port=0,
                                      tls=ServerTls(cert, key),
                                      authorizer=Authorizer(TokenFile(tokens))), streamer)
    port = await server.start()
    own = tmp_path / "own.token"
    own.write_text(TOKENS["publisher"])
    try:
        trainer = await create_trainer(settings_for(
            TrainerSettings, tmp_path, streamer_target=f"localhost:{port}", inference_target="",
            demo_task="", demo_models=False, token_file=str(own), tls_ca=str(ca.ca_path),
        ))
        async with serving(trainer, "trainer") as tr:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{tr.port}") as ch:
                run = (await tpb_grpc.TrainerServiceStub(ch).StartRun(
                    tpb.StartRunRequest(task="spiral"), timeout=10)).run
            creds = grpc.ssl_channel_credentials(ca.ca_path.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", creds) as ch:
                sub = spb_grpc.StreamerServiceStub(ch).Subscribe(
                    spb.SubscribeRequest(run_id=run.run_id), metadata=bearer("viewer"), timeout=20)
                async for frame in sub:
                    if frame.HasField("status") and frame.status.step > 0:
                        break
                sub.cancel()
    finally:
        await server.stop(0.2)


# ------------------------------------------------------------- start-up refusals


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_busy_port_is_one_line_not_a_traceback() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run("-m", "services.streamer", "--port", str(port), "--metrics-port", "-1")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    assert f"127.0.0.1:{port}" in out and "--port" in out, out


def test_tensorwire_up_names_each_busy_port_and_who_holds_it(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run("-m", "tensorwire.cli", "up", "--data-dir", str(tmp_path), "--no-metrics",
                    "--trainer-port", str(port), "--streamer-port", str(free_port()),
                    "--inference-port", str(free_port()), "--web-port", str(free_port()))
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out and "SERVING" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert f"port {port}" in lines[0] and "--trainer-port" in lines[0], out
    assert f"pid {os.getpid()}" in lines[0], out


def test_bad_tls_files_are_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "not.pem").write_text("hello")
    done = _run("-m", "services.streamer", "--tls-cert", str(tmp_path / "not.pem"),
                "--tls-key", str(tmp_path / "not.pem"), "--metrics-port", "-1")
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in out, out
    assert "not PEM" in out, out
    done = _run("-m", "services.streamer", "--tls-cert", str(tmp_path / "not.pem"))
    assert done.returncode == 2 and "--tls-key" in done.stdout, done.stdout + done.stderr


async def test_inference_http_routes_need_the_same_roles_as_their_rpcs(tmp_path: Path) -> None:
    """The HTTP/REST endpoint reads the one role table: infer needs a viewer, load an
    admin, health stays open."""
    import httpx

    from tensorwire.serving import modelrepo
    from tensorwire.serving.models import build_model

    tokens = write_tokens(tmp_path / "tokens.csv")
    settings = settings_for(InferenceSettings, tmp_path, auth_token_file=str(tokens))
    modelrepo.write_version(settings.model_repository, "spiral", "spiral",
                            build_model("spiral").state_dict())
    app = await create_inference(settings)
    body = {"inputs": [{"name": "points", "datatype": "FP32", "shape": [1, 2], "data": [0.1, 0.2]}]}
    async with serving(app, "inference", authorizer=settings.authorizer()), httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{app.http_port}", timeout=30) as http:
        assert (await http.get("/v2/health/ready")).status_code == 200
        anonymous = await http.post("/v2/models/spiral/infer", json=body)
        assert anonymous.status_code == 401 and "bearer token" in anonymous.json()["error"]
        viewer = {"Authorization": f"Bearer {TOKENS['viewer']}"}
        assert (await http.post("/v2/models/spiral/infer", json=body, headers=viewer)).status_code == 200
        denied = await http.post("/v2/repository/models/spiral/unload", headers=viewer)
        assert denied.status_code == 403 and "admin" in denied.json()["error"]
        admin = {"Authorization": f"Bearer {TOKENS['admin']}"}
        assert (await http.post("/v2/repository/models/spiral/load", headers=admin)).status_code == 200
        assert (await http.get("/v2/nope", headers=viewer)).status_code == 404


def test_ctrl_c_while_starting_stops_the_suite_promptly(tmp_path: Path) -> None:
    """Ctrl-C within a second of start-up used to hang until the 60 s start timeout."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwire.cli", "up", "--data-dir", str(tmp_path), "--no-metrics",
         "--trainer-port", str(free_port()), "--streamer-port", str(free_port()),
         "--inference-port", str(free_port()), "--inference-http-port", "-1",
         "--web-port", str(free_port()), "--demo-task", ""],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # Ctrl-C once the first service has said something: the suite is starting, not
    # yet serving (a signal before `up` has even imported asyncio is Python's own
    # KeyboardInterrupt: that happened on a loaded machine with a fixed 1 s sleep).
    assert proc.stdout is not None
    before: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        before.append(line)
        if " | " in line:
            break
    assert not any("SERVING" in line and "tensorwire up" in line for line in before), before
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=40)  # a few lines to go: the pipe cannot fill meanwhile
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(before) + proc.stdout.read()  # the same buffered reader as the lines above
    assert proc.returncode == 0, out
    assert time.monotonic() - started < 30, out
    assert "Traceback" not in out, out


def test_a_token_file_that_goes_away_keeps_the_last_tokens_and_logs_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    path = write_tokens(tmp_path / "t.csv")
    tokens = TokenFile(path, check_interval_s=1.0, clock=lambda: now[0])
    path.unlink()
    for t in range(2, 8):
        now[0] = float(t)
        assert tokens.lookup(TOKENS["viewer"]) is not None
    assert sum("not reloaded" in r.message for r in caplog.records) == 1
