"""Open Inference Protocol tensors without protobuf: the datatype table both ends use,
the ``Tensor`` type the inference core works on, and the raw little-endian wire form
(BYTES elements: a 4-byte little-endian length + the bytes) with every check on the way
in. The protobuf messages are ``tensorwire.data.oip``'s; HTTP/REST reuses the raw form.

Nothing is allocated from a peer-declared shape before the data has been checked
against it, so a hostile shape cannot make the server allocate.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tensorwire.errors import InvalidArgumentError
from tensorwire.serving.admission import echo

MAX_DIMS = 16
"""Most dimensions a tensor may declare."""

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
"""Triton datatype name -> numpy dtype (BYTES holds Python ``bytes`` objects)."""

TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""Which InferTensorContents field carries a datatype (FP16 travels raw only)."""


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if name != "BYTES" and array.dtype == dtype:
            return name
    raise InvalidArgumentError(f"no protocol datatype for numpy dtype {array.dtype}")


@dataclass(frozen=True, slots=True)
class Tensor:
    """A named array with its protocol datatype."""

    name: str
    datatype: str
    array: np.ndarray


def check_shape(name: str, dims: Sequence[int], what: str = "input") -> tuple[int, ...]:
    """A peer-declared shape: at most MAX_DIMS dims, none negative."""
    shape = tuple(dims)
    if len(shape) > MAX_DIMS:
        raise InvalidArgumentError(f"{what} {echo(name)} has {len(shape)} dims; at most {MAX_DIMS} are allowed")
    if shape and min(shape) < 0:
        raise InvalidArgumentError(f"{what} {echo(name)} has a negative dimension in shape {list(shape)}")
    return shape


def _decode_raw_bytes(name: str, raw: bytes, count: int, what: str) -> np.ndarray:
    if count * 4 > len(raw):  # every element has a 4-byte length: check before allocating
        raise InvalidArgumentError(
            f"raw BYTES {what} {echo(name)}: {len(raw)} bytes cannot hold {count} elements"
        )
    out = np.empty(count, dtype=object)
    offset, n = 0, len(raw)
    for i in range(count):
        if offset + 4 > n:
            raise InvalidArgumentError(
                f"raw BYTES {what} {echo(name)} ends after {i} of {count} elements"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > n:
            raise InvalidArgumentError(
                f"raw BYTES {what} {echo(name)}: element {i} claims {length} bytes, only {n - offset} left"
            )
        out[i] = bytes(raw[offset : offset + length])
        offset += length
    if offset != n:
        raise InvalidArgumentError(f"raw BYTES {what} {echo(name)} has {n - offset} bytes after its {count} elements")
    return out


def raw_to_array(name: str, datatype: str, data: bytes, shape: tuple[int, ...], what: str = "input") -> np.ndarray:
    """One tensor's raw little-endian bytes as a flat array, checked against its shape
    (gRPC's raw contents and HTTP's binary tensor data alike)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_raw_bytes(name, data, count, what)
    dtype = NUMPY_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgumentError(
            f"{what} {echo(name)}: raw contents hold {len(data)} bytes but shape {list(shape)} "
            f"of {datatype} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype)


def typed_to_array(name: str, datatype: str, values: Sequence, shape: tuple[int, ...],
                   what: str = "input") -> np.ndarray:
    """One tensor's typed contents (a protobuf repeated field, a list) as a flat array,
    checked against its shape."""
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgumentError(
            f"{what} {echo(name)}: {len(values)} values in contents.{TYPED_FIELD[datatype]} but shape "
            f"{list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array
    try:
        return np.array(values, dtype=NUMPY_DTYPES[datatype])
    except OverflowError:
        raise InvalidArgumentError(f"{what} {echo(name)}: a value does not fit {datatype}") from None


def encode_raw(array: np.ndarray, datatype: str) -> bytes:
    """A tensor as raw little-endian bytes (BYTES: 4-byte length + bytes per element)."""
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()
