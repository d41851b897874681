"""Domain errors. The core raises these; tensorwire.rpc.interceptor maps them to status codes.

Callers of tensorwire's own clients see the same classes back (see
``tensorwire.client``), never raw transport errors.
"""

from __future__ import annotations

import grpc


class TensorwireError(Exception):
    """Base of every domain error; ``code`` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(TensorwireError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(TensorwireError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TensorwireError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(TensorwireError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(TensorwireError):
    """Loading, draining or a dependency that is down: retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(TensorwireError):
    """A bounded queue or a cap is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(TensorwireError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLossError(TensorwireError):
    """Corrupted data (checksum mismatch)."""

    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(TensorwireError):
    """No credential, or one nobody issued."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(TensorwireError):
    """A known caller without the role the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class AbortedError(TensorwireError):
    """An operation was interrupted and rolled back."""

    code = grpc.StatusCode.ABORTED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        UnavailableError,
        ResourceExhaustedError,
        DeadlineExceededError,
        DataLossError,
        AbortedError,
        UnauthenticatedError,
        PermissionDeniedError,
    )
}


def from_status(code: grpc.StatusCode, message: str) -> TensorwireError:
    """The domain error for a status code received from a peer."""
    err = _BY_CODE.get(code, TensorwireError)(message)
    if type(err) is TensorwireError:
        err.code = code
    return err
