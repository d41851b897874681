"""The one place where errors become statuses, without sockets: a handler wrapped as the
server wraps it, called with a fake context that records the abort."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from tensorwire import errors
from tensorwire.errors import NotFoundError, ResourceExhaustedError
from tensorwire.rpc.auth import Authorizer, TokenFile
from tensorwire.rpc.interceptor import wrap_handler
from tensorwire.trainer.v1 import trainer_pb2 as pb


class Aborted(Exception):
    pass


Aborted.__name__ = "AbortError"  # what the wrapper lets pass, as grpc.aio's AbortError


class FakeContext:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)

    def code(self) -> grpc.StatusCode | None:
        return self.aborted[0] if self.aborted else None


def _wrapped(behaviour: Any, authorizer: Authorizer | None = None) -> Any:
    async def handler(request: Any, context: Any) -> Any:
        return behaviour(request)

    inner = grpc.unary_unary_rpc_method_handler(
        handler, pb.GetRunRequest.FromString, pb.GetRunResponse.SerializeToString)
    wrapped = wrap_handler("test", "/tensorwire.trainer.v1.TrainerService/GetRun", inner, authorizer)
    return wrapped.unary_unary, wrapped.request_deserializer


def _raise(exc: Exception) -> Any:
    def behaviour(request: Any) -> Any:
        raise exc
    return behaviour


@pytest.mark.parametrize(("exc", "code", "message"), [
    (NotFoundError("no run abc"), grpc.StatusCode.NOT_FOUND, "no run abc"),
    (ResourceExhaustedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
    (KeyError("secret internals"), grpc.StatusCode.INTERNAL, "internal error in "),
])
async def test_domain_errors_become_their_status_and_others_internal(
        exc: Exception, code: grpc.StatusCode, message: str) -> None:
    call, _ = _wrapped(_raise(exc))
    context = FakeContext()
    with pytest.raises(Aborted):
        await call(pb.GetRunRequest(run_id="abc"), context)
    assert context.aborted is not None
    assert context.aborted[0] == code and message in context.aborted[1]
    assert "secret internals" not in context.aborted[1]  # tracebacks go to the log only


@pytest.mark.parametrize("error", errors.TensorwireError.__subclasses__(), ids=lambda c: c.__name__)
async def test_every_domain_error_aborts_with_its_own_code_and_message(
        error: type[errors.TensorwireError]) -> None:
    call, _ = _wrapped(_raise(error("what went wrong")))
    context = FakeContext()
    with pytest.raises(Aborted):
        await call(pb.GetRunRequest(run_id="abc"), context)
    assert context.aborted == (error.code, "what went wrong")


async def test_unparseable_bytes_are_invalid_argument_naming_the_type() -> None:
    call, parse = _wrapped(lambda request: pb.GetRunResponse())
    context = FakeContext()
    with pytest.raises(Aborted):
        await call(parse(b"\xff\xff\xff"), context)
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensorwire.trainer.v1.GetRunRequest" in context.aborted[1]


async def test_the_role_check_runs_before_the_handler(tmp_path: Any) -> None:
    tokens = tmp_path / "t.csv"
    tokens.write_text('v,viewer,1,"tensorwire:viewer"\n')
    ran: list[Any] = []
    call, _ = _wrapped(lambda request: ran.append(request) or pb.GetRunResponse(),
                       Authorizer(TokenFile(tokens)))
    context = FakeContext()
    with pytest.raises(Aborted):
        await call(pb.GetRunRequest(), context)
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    assert not ran
    reply = await call(pb.GetRunRequest(), FakeContext((("authorization", "Bearer v"),)))
    assert isinstance(reply, pb.GetRunResponse) and len(ran) == 1


async def test_a_forwarded_stream_message_counts_with_its_stream(tmp_path: Any) -> None:
    """A call tagged with this process's stream-message secret (the native inference
    frontend's forward of one ModelStreamInfer message) records no RPC metrics and
    skips the role check (its stream passed it); a wrong tag changes nothing."""
    from prometheus_client import REGISTRY

    from tensorwire.rpc import interceptor

    tokens = tmp_path / "t.csv"
    tokens.write_text('v,viewer,1,"tensorwire:viewer"\n')
    call, _ = _wrapped(lambda request: pb.GetRunResponse(), Authorizer(TokenFile(tokens)))
    labels = {"service": "test", "method": "GetRun", "code": "OK"}

    def handled() -> float:
        return REGISTRY.get_sample_value("tensorwire_rpc_handled_total", labels) or 0.0

    tag = interceptor.STREAM_MESSAGE_HEADER
    before = handled()
    reply = await call(pb.GetRunRequest(), FakeContext(((tag, interceptor.stream_message_token()),)))
    assert isinstance(reply, pb.GetRunResponse) and handled() == before
    context = FakeContext(((tag, "guessed"),))
    with pytest.raises(Aborted):  # an unknown tag: checked (no token: refused) and counted
        await call(pb.GetRunRequest(), context)
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    await call(pb.GetRunRequest(), FakeContext(((tag, "guessed"), ("authorization", "Bearer v"))))
    assert handled() == before + 1
