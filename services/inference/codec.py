"""Open Inference Protocol tensors <-> numpy arrays, with every check on the way in.

Inputs come either all as ``raw_input_contents`` (little-endian bytes; BYTES
elements are a 4-byte little-endian length + the bytes) or all as typed
``contents``; outputs go back raw when the request was raw, typed otherwise.
Nothing is allocated from a client-declared shape before the data has been
checked against it, so a hostile shape cannot make the server allocate.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tensorwire.admission import echo
from tensorwire.errors import InvalidArgumentError
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.tensors import NUMPY_DTYPES, TYPED_FIELD

MAX_DIMS = 16


@dataclass(frozen=True, slots=True)
class Tensor:
    """A named array with its protocol datatype."""

    name: str
    datatype: str
    array: np.ndarray


def _shape(name: str, dims: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(dims)
    if len(shape) > MAX_DIMS:
        raise InvalidArgumentError(f"input {echo(name)} has {len(shape)} dims; at most {MAX_DIMS} are allowed")
    if shape and min(shape) < 0:
        raise InvalidArgumentError(f"input {echo(name)} has a negative dimension in shape {list(shape)}")
    return shape


def _decode_raw_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    if count * 4 > len(raw):  # every element has a 4-byte length: check before allocating
        raise InvalidArgumentError(
            f"raw BYTES input {echo(name)}: {len(raw)} bytes cannot hold {count} elements"
        )
    out = np.empty(count, dtype=object)
    offset, n = 0, len(raw)
    for i in range(count):
        if offset + 4 > n:
            raise InvalidArgumentError(
                f"raw BYTES input {echo(name)} ends after {i} of {count} elements"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > n:
            raise InvalidArgumentError(
                f"raw BYTES input {echo(name)}: element {i} claims {length} bytes, only {n - offset} left"
            )
        out[i] = bytes(raw[offset : offset + length])
        offset += length
    if offset != n:
        raise InvalidArgumentError(f"raw BYTES input {echo(name)} has {n - offset} bytes after its {count} elements")
    return out


def raw_to_array(name: str, datatype: str, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """One input's raw little-endian bytes as a flat array, checked against its shape
    (gRPC's raw_input_contents and HTTP's binary tensor data alike)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_raw_bytes(name, data, count)
    dtype = NUMPY_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgumentError(
            f"input {echo(name)}: raw contents hold {len(data)} bytes but shape {list(shape)} "
            f"of {datatype} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype)


def check_shape(name: str, dims: Sequence[int]) -> tuple[int, ...]:
    """A client-declared shape: at most MAX_DIMS dims, none negative."""
    return _shape(name, dims)


def decode_inputs(request: pb.ModelInferRequest) -> tuple[list[Tensor], bool]:
    """The request's inputs as arrays; and whether they came raw."""
    raw_contents, inputs = request.raw_input_contents, request.inputs
    raw = len(raw_contents) > 0
    if raw and len(raw_contents) != len(inputs):
        raise InvalidArgumentError(f"request has {len(inputs)} inputs but {len(raw_contents)} raw_input_contents")
    tensors = []
    if len(inputs) > 1:
        seen: set[str] = set()
        for spec in inputs:
            if spec.name in seen:
                raise InvalidArgumentError(f"input {spec.name!r} appears twice in the request")
            seen.add(spec.name)
    for index, spec in enumerate(inputs):
        name, datatype = spec.name, spec.datatype
        dtype = NUMPY_DTYPES.get(datatype)
        if dtype is None:
            raise InvalidArgumentError(
                f"input {echo(name)} has unknown datatype {echo(datatype)}; known: {', '.join(NUMPY_DTYPES)}"
            )
        shape = _shape(name, spec.shape)
        count = math.prod(shape)
        if raw:
            if spec.HasField("contents"):
                raise InvalidArgumentError(
                    f"input {echo(name)} has typed contents while the request uses raw_input_contents; "
                    "send one or the other"
                )
            array = raw_to_array(name, datatype, raw_contents[index], shape)
        else:
            field = TYPED_FIELD.get(datatype)
            if field is None:
                raise InvalidArgumentError(
                    f"input {echo(name)}: {datatype} has no typed contents; send it in raw_input_contents"
                )
            values = getattr(spec.contents, field)
            if len(values) != count:
                raise InvalidArgumentError(
                    f"input {echo(name)}: {len(values)} values in contents.{field} but shape {list(shape)} "
                    f"needs {count}"
                )
            if datatype == "BYTES":
                array = np.empty(count, dtype=object)
                array[:] = list(values)
            else:
                try:
                    array = np.array(values, dtype=dtype)
                except OverflowError:
                    raise InvalidArgumentError(f"input {echo(name)}: a value does not fit {datatype}") from None
        try:
            tensors.append(Tensor(name, datatype, array.reshape(shape)))
        except ValueError as exc:  # e.g. a zero-size shape whose other dims overflow
            raise InvalidArgumentError(f"input {echo(name)}: shape {list(shape)} is unusable: {exc}") from None
    return tensors, raw


def encode_raw(array: np.ndarray, datatype: str) -> bytes:
    """An output as raw little-endian bytes (BYTES: 4-byte length + bytes per element)."""
    return _encode_raw(array, datatype)


def _encode_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


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
            response.raw_output_contents.append(_encode_raw(tensor.array, tensor.datatype))
        else:
            field = getattr(out.contents, TYPED_FIELD[tensor.datatype])
            flat = tensor.array.reshape(-1)
            field.extend(flat.tolist() if tensor.datatype != "BYTES" else list(flat))
    return response


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The outputs of a response as arrays (raw or typed), for clients and tests."""
    result = {}
    for index, out in enumerate(response.outputs):
        shape = tuple(out.shape)
        if response.raw_output_contents:
            data = response.raw_output_contents[index]
            if out.datatype == "BYTES":
                array = _decode_raw_bytes(out.name, data, math.prod(shape))
            else:
                array = np.frombuffer(data, dtype=NUMPY_DTYPES[out.datatype])
        else:
            values = getattr(out.contents, TYPED_FIELD[out.datatype])
            array = np.array(list(values), dtype=NUMPY_DTYPES[out.datatype])
        result[out.name] = array.reshape(shape)
    return result
