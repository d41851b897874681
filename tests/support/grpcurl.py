"""What grpcurl does (list, describe, call with JSON), over server reflection.

grpcurl itself cannot be installed here; this client does the same steps with
grpc's reflection protocol, so the tests prove an operator's grpcurl works.
"""

from __future__ import annotations

import collections
import json

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


class _Headers(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """grpcurl's ``-H 'name: value'``: metadata on every call."""

    def __init__(self, headers: tuple[tuple[str, str], ...]) -> None:
        self.headers = headers

    def _details(self, details):  # type: ignore[no-untyped-def]
        return _Details(details.method, details.timeout,
                        (*(details.metadata or ()), *self.headers), details.credentials,
                        getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


class _Details(collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class Grpcurl:
    def __init__(self, target: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.channel = grpc.insecure_channel(target)
        if headers:
            self.channel = grpc.intercept_channel(self.channel, _Headers(headers))
        self.db = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def list(self) -> list[str]:
        return sorted(self.db.get_services())

    def describe(self, symbol: str):
        """A service, method or message descriptor, as `grpcurl describe`."""
        try:
            return self.pool.FindServiceByName(symbol)
        except KeyError:
            pass
        try:
            return self.pool.FindMessageTypeByName(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            return self.pool.FindServiceByName(service).methods_by_name[method]

    def call(self, method: str, body: str, timeout: float = 10.0) -> dict:
        """`grpcurl -d BODY host:port pkg.Service/Method` for a unary method."""
        service, _, name = method.partition("/")
        desc = self.pool.FindServiceByName(service).methods_by_name[name]
        req_cls = message_factory.GetMessageClass(desc.input_type)
        resp_cls = message_factory.GetMessageClass(desc.output_type)
        request = json_format.Parse(body, req_cls())
        rpc = self.channel.unary_unary(
            f"/{service}/{name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp_cls.FromString,
        )
        reply = rpc(request, timeout=timeout)
        return json.loads(json_format.MessageToJson(reply))

    def close(self) -> None:
        self.channel.close()
