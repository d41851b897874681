from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_UNSPECIFIED: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]
    COMPRESSION_GZIP: _ClassVar[Compression]
COMPRESSION_UNSPECIFIED: Compression
COMPRESSION_ZSTD: Compression
COMPRESSION_GZIP: Compression

class Chunk(_message.Message):
    __slots__ = ("index", "offset", "data", "compression", "raw_size", "crc32")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    data: bytes
    compression: Compression
    raw_size: int
    crc32: int
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ..., raw_size: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("model", "kind", "model_args_json", "version", "total_bytes", "triton_config")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRITON_CONFIG_FIELD_NUMBER: _ClassVar[int]
    model: str
    kind: str
    model_args_json: str
    version: int
    total_bytes: int
    triton_config: str
    def __init__(self, model: _Optional[str] = ..., kind: _Optional[str] = ..., model_args_json: _Optional[str] = ..., version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., triton_config: _Optional[str] = ...) -> None: ...

class UploadTrailer(_message.Message):
    __slots__ = ("crc32", "total_bytes", "chunks")
    CRC32_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    crc32: int
    total_bytes: int
    chunks: int
    def __init__(self, crc32: _Optional[int] = ..., total_bytes: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class UploadModelRequest(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    trailer: UploadTrailer
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., trailer: _Optional[_Union[UploadTrailer, _Mapping]] = ...) -> None: ...

class UploadModelResponse(_message.Message):
    __slots__ = ("model", "version", "bytes", "crc32", "chunks", "wire_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    bytes: int
    crc32: int
    chunks: int
    wire_bytes: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., bytes: _Optional[int] = ..., crc32: _Optional[int] = ..., chunks: _Optional[int] = ..., wire_bytes: _Optional[int] = ...) -> None: ...
