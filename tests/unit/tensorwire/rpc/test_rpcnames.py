"""tensorwire.rpc.rpcnames: method paths come from the descriptors, a wrong name fails at once."""

from __future__ import annotations

import pytest

from tensorwire.calls import publishing
from tensorwire.inference import grpc_service_pb2
from tensorwire.rpc import auth
from tensorwire.rpc.rpcnames import method_names, method_path, service_name
from tensorwire.streamer.v1 import streamer_pb2


def test_paths_are_the_ones_grpc_calls() -> None:
    assert method_path(streamer_pb2, "StreamerService", "Publish") == "/tensorwire.streamer.v1.StreamerService/Publish"
    assert publishing.PUBLISH_METHOD == "/tensorwire.streamer.v1.StreamerService/Publish"
    assert service_name(grpc_service_pb2, "GRPCInferenceService") == "inference.GRPCInferenceService"
    assert method_names(streamer_pb2, "StreamerService") == {"Subscribe", "Publish", "Ack"}


def test_a_name_the_proto_lacks_fails_at_once() -> None:
    with pytest.raises(KeyError, match="Publsh"):
        method_path(streamer_pb2, "StreamerService", "Publsh")
    with pytest.raises(KeyError, match="StreamService"):
        service_name(streamer_pb2, "StreamService")


def test_every_inference_method_has_a_role() -> None:
    for method in method_names(grpc_service_pb2, "GRPCInferenceService"):
        assert method_path(grpc_service_pb2, "GRPCInferenceService", method) in auth.METHOD_ROLES
