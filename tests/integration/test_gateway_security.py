"""The gateway's guard on a real socket, in front of a trainer that checks tokens:
DNS rebinding, cross-site calls, the control-call rate limit, security headers,
and the browser's bearer token passed through (never the gateway's own)."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from services.gateway.app import Gateway
from services.gateway.guard import RateLimiter, hostname
from services.gateway.settings import GatewaySettings
from services.streamer.app import create_app as create_streamer
from services.streamer.settings import StreamerSettings
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tensorwire.rpc.auth import Authorizer, TokenFile
from tensorwire.trainer.v1 import trainer_pb2
from tests.conftest import free_port, serving, settings_for
from tests.integration.test_security import TOKENS, write_tokens

TRAINER = "/tensorwire.trainer.v1.TrainerService"
BINARY = {"Content-Type": "application/grpc-web+proto", "X-Grpc-Web": "1"}


def framed(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


@dataclasses.dataclass
class Suite:
    url: str
    port: int
    http: aiohttp.ClientSession


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    tokens = write_tokens(tmp_path / "tokens.csv")
    authorizer = Authorizer(TokenFile(tokens))
    own = tmp_path / "own.token"
    own.write_text(TOKENS["publisher"])
    streamer = await create_streamer(settings_for(StreamerSettings, tmp_path))
    async with serving(streamer, "streamer", authorizer=authorizer) as st:
        trainer = await create_trainer(settings_for(
            TrainerSettings, tmp_path, streamer_target=f"127.0.0.1:{st.port}", inference_target="",
            demo_task="", demo_models=False, token_file=str(own),
        ))
        async with serving(trainer, "trainer", authorizer=authorizer) as tr:
            static = tmp_path / "dist"
            (static / "assets").mkdir(parents=True)
            (static / "index.html").write_text("<!doctype html><title>tensorwire</title>")
            settings = GatewaySettings(
                host="127.0.0.1", port=0, trainer_target=f"127.0.0.1:{tr.port}",
                streamer_target=f"127.0.0.1:{st.port}", inference_target=f"127.0.0.1:{free_port()}",
                static_dir=static, grace_s=1.0, control_rate_per_s=0.5, control_burst=3,
                auth_token_file=str(tokens),
                # The gateway's own environment must never become a browser's identity.
                token_file=str(own),
            )
            gateway = Gateway(settings)
            port = await gateway.start()
            try:
                async with aiohttp.ClientSession() as http:
                    yield Suite(f"http://127.0.0.1:{port}", port, http)
            finally:
                await gateway.aclose()


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


async def _call(suite: Suite, method: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, str]:
    async with suite.http.post(f"{suite.url}{TRAINER}/{method}", data=framed(body),
                               headers={**BINARY, **headers}) as reply:
        raw = await reply.read()
        status = reply.headers.get("grpc-status", "")
        message = reply.headers.get("grpc-message", "")
        if not status and raw:  # trailers in the body
            tail = raw[raw.rfind(b"\x80"):]
            for line in tail[5:].decode(errors="replace").split("\r\n"):
                if line.startswith("grpc-status:"):
                    status = line.split(":", 1)[1].strip()
                if line.startswith("grpc-message:"):
                    message = line.split(":", 1)[1].strip()
        return reply.status, status, message


async def test_the_browsers_token_passes_through_and_none_is_added(suite: Suite) -> None:
    list_runs = trainer_pb2.ListRunsRequest().SerializeToString()
    http, status, message = await _call(suite, "ListRuns", list_runs, {})
    assert (http, status) == (200, "16"), message  # UNAUTHENTICATED, not the gateway's identity
    http, status, _ = await _call(suite, "ListRuns", list_runs, _bearer("viewer"))
    assert (http, status) == (200, "0")
    start = trainer_pb2.StartRunRequest(task="spiral").SerializeToString()
    http, status, message = await _call(suite, "StartRun", start, _bearer("viewer"))
    assert status == "7" and "operator" in message, message  # PERMISSION_DENIED


async def test_dns_rebinding_host_is_refused(suite: Suite) -> None:
    headers = {**_bearer("operator"), "Host": "evil.example", "Origin": "http://evil.example"}
    start = trainer_pb2.StartRunRequest(task="spiral").SerializeToString()
    http, _, _ = await _call(suite, "StartRun", start, headers)
    assert http == 403
    async with suite.http.get(f"{suite.url}/", headers={"Host": f"evil.example:{suite.port}"}) as reply:
        assert reply.status == 403
        assert "--allowed-hosts" in await reply.text()
    async with suite.http.get(f"{suite.url}/", headers={"Host": f"localhost:{suite.port}"}) as reply:
        assert reply.status == 200


async def test_cross_site_calls_are_refused(suite: Suite) -> None:
    start = trainer_pb2.StartRunRequest(task="spiral").SerializeToString()
    http, _, _ = await _call(suite, "StartRun", start,
                             {**_bearer("operator"), "Origin": "http://attacker.example"})
    assert http == 403
    http, _, _ = await _call(suite, "StartRun", start,
                             {**_bearer("operator"), "Sec-Fetch-Site": "cross-site"})
    assert http == 403
    # The page's own origin, and callers without a browser context, pass.
    http, status, _ = await _call(suite, "StartRun", start,
                                  {**_bearer("operator"), "Origin": suite.url})
    assert (http, status) == (200, "0")


async def test_control_calls_are_rate_limited_per_token(suite: Suite) -> None:
    stop = trainer_pb2.StopRunRequest(run_id="nope").SerializeToString()
    codes = [(await _call(suite, "StopRun", stop, _bearer("operator")))[1] for _ in range(6)]
    assert codes[:3] == ["5", "5", "5"], codes  # NOT_FOUND: the calls went through
    assert "8" in codes[3:], codes  # RESOURCE_EXHAUSTED once the burst is spent
    # Another token has its own budget; reads are not limited.
    assert (await _call(suite, "StopRun", stop, _bearer("admin")))[1] == "5"
    list_runs = trainer_pb2.ListRunsRequest().SerializeToString()
    for _ in range(10):
        assert (await _call(suite, "ListRuns", list_runs, _bearer("operator")))[1] == "0"


async def test_page_has_security_headers(suite: Suite) -> None:
    async with suite.http.get(f"{suite.url}/") as reply:
        assert reply.status == 200
        csp = reply.headers["Content-Security-Policy"]
        script_src = next(part for part in csp.split(";") if "script-src" in part)
        assert "'unsafe-inline'" not in script_src and "'self'" in script_src
        assert "frame-ancestors 'none'" in csp
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["Referrer-Policy"] == "no-referrer"
    # An RPC answer is no document: nosniff only (each byte counts on a slow link).
    list_runs = trainer_pb2.ListRunsRequest().SerializeToString()
    async with suite.http.post(f"{suite.url}{TRAINER}/ListRuns", data=framed(list_runs),
                               headers={**BINARY, **_bearer("viewer")}) as reply:
        assert reply.status == 200 and b"grpc-status:0" in await reply.read(), dict(reply.headers)
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert "Content-Security-Policy" not in reply.headers


async def test_gateway_metrics_need_a_viewer_token(suite: Suite) -> None:
    async with suite.http.get(f"{suite.url}/metrics") as reply:
        assert reply.status == 401
    async with suite.http.get(f"{suite.url}/metrics", headers=_bearer("viewer")) as reply:
        assert reply.status == 200


async def test_non_ascii_header_is_invalid_argument_not_internal(suite: Suite) -> None:
    list_runs = trainer_pb2.ListRunsRequest().SerializeToString()
    http, status, message = await _call(suite, "ListRuns", list_runs,
                                        {**_bearer("viewer"), "x-note": "caf\u00e9"})
    assert (http, status) == (200, "3"), message
    assert "x-note" in message


def test_rate_limiter_refills_and_bounds_its_keys() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 2, clock=lambda: now[0], max_keys=3)
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    now[0] = 0.5
    assert limiter.allow("a") and not limiter.allow("a")
    for key in "bcdef":
        limiter.allow(key)
    assert len(limiter._buckets) == 3


def test_hostname_parsing() -> None:
    assert hostname("Example.org:8080") == "example.org"
    assert hostname("[::1]:8080") == "::1"
    assert hostname("127.0.0.1") == "127.0.0.1"
