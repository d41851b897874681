"""Open Inference Protocol messages <-> ``Tensor`` values: the one codec of ModelInfer's
tensors, used by the inference service (requests in, responses out) and by
``tensorwire.client`` (responses in).

Inputs come either all as ``raw_input_contents`` or all as typed ``contents``;
outputs go back raw when the request was raw, typed otherwise (raw contents cover
every tensor or none). The wire forms and their checks are ``tensorwire.data.tensors``'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tensorwire.data.tensors import (
    NUMPY_DTYPES,
    TYPED_FIELD,
    Tensor,
    check_shape,
    encode_raw,
    raw_to_array,
    typed_to_array,
)
from tensorwire.errors import InvalidArgumentError
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.serving.admission import echo


def _decode(what: str, specs: Sequence, raw_contents: Sequence[bytes]) -> list[Tensor]:
    """Request inputs or response outputs (``what``) as Tensors, raw or typed."""
    message, raw_field = ("request" if what == "input" else "response"), f"raw_{what}_contents"
    raw = len(raw_contents) > 0
    if raw and len(raw_contents) != len(specs):
        raise InvalidArgumentError(f"{message} has {len(specs)} {what}s but {len(raw_contents)} {raw_field}")
    if len(specs) > 1:
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise InvalidArgumentError(f"{what} {spec.name!r} appears twice in the {message}")
            seen.add(spec.name)
    tensors = []
    for index, spec in enumerate(specs):
        name, datatype = spec.name, spec.datatype
        if datatype not in NUMPY_DTYPES:
            raise InvalidArgumentError(
                f"{what} {echo(name)} has unknown datatype {echo(datatype)}; known: {', '.join(NUMPY_DTYPES)}"
            )
        shape = check_shape(name, spec.shape, what)
        if raw:
            if spec.HasField("contents"):
                raise InvalidArgumentError(
                    f"{what} {echo(name)} has typed contents while the {message} uses {raw_field}; "
                    "send one or the other"
                )
            array = raw_to_array(name, datatype, raw_contents[index], shape, what)
        else:
            field = TYPED_FIELD.get(datatype)
            if field is None:
                raise InvalidArgumentError(
                    f"{what} {echo(name)}: {datatype} has no typed contents; send it in {raw_field}"
                )
            array = typed_to_array(name, datatype, getattr(spec.contents, field), shape, what)
        try:
            tensors.append(Tensor(name, datatype, array.reshape(shape)))
        except ValueError as exc:  # e.g. a zero-size shape whose other dims overflow
            raise InvalidArgumentError(f"{what} {echo(name)}: shape {list(shape)} is unusable: {exc}") from None
    return tensors


def decode_inputs(request: pb.ModelInferRequest) -> tuple[list[Tensor], bool]:
    """The request's inputs as Tensors; and whether they came raw."""
    return _decode("input", request.inputs, request.raw_input_contents), len(request.raw_input_contents) > 0


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The outputs of a response as arrays by name (raw or typed contents; BYTES
    elements as ``bytes``)."""
    return {t.name: t.array for t in _decode("output", response.outputs, response.raw_output_contents)}


def encode_outputs(
    response: pb.ModelInferResponse, outputs: Sequence[Tensor], *, raw: bool
) -> pb.ModelInferResponse:
    """Append ``outputs`` to ``response`` (raw or typed contents).

    Raw contents cover every output or none, so an output without a typed field
    (FP16) makes the whole response raw."""
    raw = raw or any(t.datatype not in TYPED_FIELD for t in outputs)
    for tensor in outputs:
        out = response.outputs.add()
        out.name = tensor.name
        out.datatype = tensor.datatype
        out.shape.extend(tensor.array.shape)
        if raw:
            response.raw_output_contents.append(encode_raw(tensor.array, tensor.datatype))
        else:
            field = getattr(out.contents, TYPED_FIELD[tensor.datatype])
            flat = tensor.array.reshape(-1)
            field.extend(flat.tolist() if tensor.datatype != "BYTES" else list(flat))
    return response
