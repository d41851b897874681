from tensorwire.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscribeRequest(_message.Message):
    __slots__ = ("run_id", "max_fps", "views", "accept_codecs", "max_points", "reuse_arrays", "acks")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_FPS_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_CODECS_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    REUSE_ARRAYS_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    max_fps: float
    views: _containers.RepeatedScalarFieldContainer[str]
    accept_codecs: _containers.RepeatedScalarFieldContainer[_common_pb2.Codec]
    max_points: int
    reuse_arrays: bool
    acks: bool
    def __init__(self, run_id: _Optional[str] = ..., max_fps: _Optional[float] = ..., views: _Optional[_Iterable[str]] = ..., accept_codecs: _Optional[_Iterable[_Union[_common_pb2.Codec, str]]] = ..., max_points: _Optional[int] = ..., reuse_arrays: _Optional[bool] = ..., acks: _Optional[bool] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("step", "produced_at", "sent_at", "status", "scalars", "view", "snapshot", "seq", "subscription_id")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PRODUCED_AT_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    step: int
    produced_at: float
    sent_at: float
    status: _common_pb2.RunStatus
    scalars: _common_pb2.ScalarBatch
    view: _common_pb2.View
    snapshot: bool
    seq: int
    subscription_id: str
    def __init__(self, step: _Optional[int] = ..., produced_at: _Optional[float] = ..., sent_at: _Optional[float] = ..., status: _Optional[_Union[_common_pb2.RunStatus, _Mapping]] = ..., scalars: _Optional[_Union[_common_pb2.ScalarBatch, _Mapping]] = ..., view: _Optional[_Union[_common_pb2.View, _Mapping]] = ..., snapshot: _Optional[bool] = ..., seq: _Optional[int] = ..., subscription_id: _Optional[str] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("run_id", "step", "produced_at", "status", "scalars", "view")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PRODUCED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    produced_at: float
    status: _common_pb2.RunStatus
    scalars: _common_pb2.ScalarBatch
    view: _common_pb2.View
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., produced_at: _Optional[float] = ..., status: _Optional[_Union[_common_pb2.RunStatus, _Mapping]] = ..., scalars: _Optional[_Union[_common_pb2.ScalarBatch, _Mapping]] = ..., view: _Optional[_Union[_common_pb2.View, _Mapping]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("watchers", "demand")
    class WatchersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DemandEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ViewDemand
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ViewDemand, _Mapping]] = ...) -> None: ...
    WATCHERS_FIELD_NUMBER: _ClassVar[int]
    DEMAND_FIELD_NUMBER: _ClassVar[int]
    watchers: _containers.ScalarMap[str, int]
    demand: _containers.MessageMap[str, ViewDemand]
    def __init__(self, watchers: _Optional[_Mapping[str, int]] = ..., demand: _Optional[_Mapping[str, ViewDemand]] = ...) -> None: ...

class ViewDemand(_message.Message):
    __slots__ = ("views", "max_fps")
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    MAX_FPS_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedScalarFieldContainer[str]
    max_fps: float
    def __init__(self, views: _Optional[_Iterable[str]] = ..., max_fps: _Optional[float] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("subscription_id", "run_id", "seq", "received_at")
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    subscription_id: str
    run_id: str
    seq: int
    received_at: float
    def __init__(self, subscription_id: _Optional[str] = ..., run_id: _Optional[str] = ..., seq: _Optional[int] = ..., received_at: _Optional[float] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("server_time", "delivery_bytes_per_s", "in_flight_bytes")
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    server_time: float
    delivery_bytes_per_s: float
    in_flight_bytes: int
    def __init__(self, server_time: _Optional[float] = ..., delivery_bytes_per_s: _Optional[float] = ..., in_flight_bytes: _Optional[int] = ...) -> None: ...
