"""tensorwire.data.oip: the one ModelInfer tensor codec (the service's and the client's)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorwire import client
from tensorwire.data import oip
from tensorwire.data.tensors import Tensor
from tensorwire.errors import InvalidArgumentError
from tensorwire.inference import grpc_service_pb2 as pb


def test_the_client_decodes_with_the_service_codec() -> None:
    assert client.decode_outputs is oip.decode_outputs


@pytest.mark.parametrize("raw", [True, False])
def test_bytes_outputs_decode_the_same_raw_or_typed(raw: bool) -> None:
    words = np.array([b"a", b"", b"\xff\x00"], dtype=object).reshape(3, 1)
    numbers = np.arange(6, dtype=np.int32).reshape(2, 3)
    response = oip.encode_outputs(
        pb.ModelInferResponse(), [Tensor("w", "BYTES", words), Tensor("n", "INT32", numbers)], raw=raw)
    assert bool(response.raw_output_contents) is raw
    decoded = oip.decode_outputs(pb.ModelInferResponse.FromString(response.SerializeToString()))
    assert decoded["w"].shape == (3, 1) and decoded["w"].reshape(-1).tolist() == [b"a", b"", b"\xff\x00"]
    assert decoded["n"].dtype == np.int32 and decoded["n"].tolist() == numbers.tolist()


@pytest.mark.parametrize("response, message", [
    (pb.ModelInferResponse(outputs=[pb.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32", shape=[2])],
                           raw_output_contents=[b"\0" * 4]), "output 'y': raw contents hold 4 bytes"),
    (pb.ModelInferResponse(outputs=[pb.ModelInferResponse.InferOutputTensor(name="y", datatype="BYTES", shape=[2])],
                           raw_output_contents=[b"\1\0\0\0x"]), "raw BYTES output 'y'"),
    (pb.ModelInferResponse(outputs=[pb.ModelInferResponse.InferOutputTensor(name="y", datatype="F32", shape=[1])]),
     "output 'y' has unknown datatype 'F32'"),
    (pb.ModelInferResponse(outputs=[pb.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32", shape=[1])],
                           raw_output_contents=[b"\0" * 4, b"\0" * 4]), "response has 1 outputs but 2 raw_output"),
])
def test_a_malformed_response_is_refused_by_name(response: pb.ModelInferResponse, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        oip.decode_outputs(response)
