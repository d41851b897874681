"""GrpcClient without sockets: its pool runs on the scripted backend, a fake clock
drives deadlines and the waits between retries; statuses come back as domain errors."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tensorwire import errors
from tensorwire.calls.channels import ChannelPool
from tensorwire.client import GrpcClient, RetryPolicy
from tests.support.clock import FakeClock
from tests.support.fake_channels import Backend, rpc_error

METHOD = "/test.v1.Things/Get"
OK = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
NO_JITTER = RetryPolicy(attempts=5, initial_backoff_s=0.05, max_backoff_s=2.0, jitter=0.0)


def make_client(*answers: Any, timeout_s: float = 30.0,
                retry: RetryPolicy = NO_JITTER) -> tuple[GrpcClient, Backend, FakeClock]:
    backend, clock = Backend(answers={METHOD: list(answers)}), FakeClock()
    pool = ChannelPool("a:1", connect=backend.connect, clock=clock, name="t",
                       health_check_interval_s=0)
    client = GrpcClient(pool, timeout_s=timeout_s, retry=retry, clock=clock, sleep=clock.sleep)
    return client, backend, clock


async def call(client: GrpcClient, idempotent: bool = True) -> Any:
    return await client.unary(METHOD, health_pb2.HealthCheckRequest(service="x"),
                              health_pb2.HealthCheckResponse, idempotent=idempotent)


@pytest.mark.parametrize(("code", "error"), [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
    (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
    (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExistsError),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError),
    (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
    (grpc.StatusCode.DATA_LOSS, errors.DataLossError),
    (grpc.StatusCode.ABORTED, errors.AbortedError),
    (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
])
async def test_each_status_comes_back_as_its_domain_error(code: grpc.StatusCode,
                                                          error: type[errors.TensorwireError]) -> None:
    client, backend, _ = make_client(rpc_error(code, "it said no"))
    with pytest.raises(error, match="^Get: it said no$") as raised:
        await call(client, idempotent=False)
    assert type(raised.value) is error and raised.value.code == code
    assert len(backend.calls) == 1


@pytest.mark.parametrize("code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED])
async def test_other_statuses_are_the_base_error_carrying_the_code(code: grpc.StatusCode) -> None:
    client, _, _ = make_client(rpc_error(code))
    with pytest.raises(errors.TensorwireError, match=f"^Get: {code.name}$") as raised:
        await call(client)
    assert type(raised.value) is errors.TensorwireError and raised.value.code == code


def test_from_status_round_trips_every_domain_error() -> None:
    for cls in errors.TensorwireError.__subclasses__():
        err = errors.from_status(cls.code, "m")
        assert type(err) is cls and str(err) == "m"


async def test_an_idempotent_call_is_retried_after_unavailable_by_the_backoff() -> None:
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, "restarting")
    client, backend, clock = make_client(down, down, OK)
    assert await call(client) == OK
    assert client.retries == 2
    assert clock.slept == [0.05, 0.1]
    # Each try gets what is left of the one deadline.
    assert [c[3] for c in backend.calls] == pytest.approx([30.0, 29.95, 29.85])


async def test_only_idempotent_calls_and_only_retry_codes_are_retried() -> None:
    client, backend, clock = make_client(rpc_error(grpc.StatusCode.UNAVAILABLE), OK)
    with pytest.raises(errors.UnavailableError):
        await call(client, idempotent=False)
    assert client.retries == 0 and clock.slept == [] and len(backend.calls) == 1

    client, backend, clock = make_client(rpc_error(grpc.StatusCode.INTERNAL), OK)
    with pytest.raises(errors.TensorwireError):
        await call(client)
    assert client.retries == 0 and clock.slept == [] and len(backend.calls) == 1


async def test_retries_stop_at_the_attempt_limit_and_at_the_deadline() -> None:
    down = rpc_error(grpc.StatusCode.UNAVAILABLE)
    client, backend, clock = make_client(*[down] * 3, OK,
                                         retry=RetryPolicy(attempts=3, jitter=0.0))
    with pytest.raises(errors.UnavailableError):
        await call(client)
    assert len(backend.calls) == 3 and clock.slept == [0.05, 0.1]

    # 0.12 s in all: the second wait (0.1 s after 0.05 s) would pass the deadline.
    client, backend, clock = make_client(down, down, OK, timeout_s=0.12)
    with pytest.raises(errors.UnavailableError):
        await call(client)
    assert len(backend.calls) == 2 and clock.slept == [0.05]


async def test_a_deadline_already_passed_is_deadline_exceeded_without_a_try() -> None:
    client, backend, _ = make_client(OK)
    with pytest.raises(errors.DeadlineExceededError, match="no answer within 0s"):
        await client.unary(METHOD, health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse,
                           idempotent=True, timeout_s=0)
    assert backend.calls == []
