import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KpiGroupKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KPI_GROUP_KIND_UNSPECIFIED: _ClassVar[KpiGroupKind]
    KPI_GROUP_KIND_NAMED: _ClassVar[KpiGroupKind]
    KPI_GROUP_KIND_MISSING: _ClassVar[KpiGroupKind]
    KPI_GROUP_KIND_OTHER: _ClassVar[KpiGroupKind]
KPI_GROUP_KIND_UNSPECIFIED: KpiGroupKind
KPI_GROUP_KIND_NAMED: KpiGroupKind
KPI_GROUP_KIND_MISSING: KpiGroupKind
KPI_GROUP_KIND_OTHER: KpiGroupKind

class DefineViewRequest(_message.Message):
    __slots__ = ("definition",)
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    definition: str
    def __init__(self, definition: _Optional[str] = ...) -> None: ...

class DefineViewResponse(_message.Message):
    __slots__ = ("view", "replaced")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    view: View
    replaced: bool
    def __init__(self, view: _Optional[_Union[View, _Mapping]] = ..., replaced: _Optional[bool] = ...) -> None: ...

class View(_message.Message):
    __slots__ = ("name", "definition", "defined_at", "defined_by", "backfill")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    DEFINED_AT_FIELD_NUMBER: _ClassVar[int]
    DEFINED_BY_FIELD_NUMBER: _ClassVar[int]
    BACKFILL_FIELD_NUMBER: _ClassVar[int]
    name: str
    definition: str
    defined_at: _timestamp_pb2.Timestamp
    defined_by: str
    backfill: Backfill
    def __init__(self, name: _Optional[str] = ..., definition: _Optional[str] = ..., defined_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., defined_by: _Optional[str] = ..., backfill: _Optional[_Union[Backfill, _Mapping]] = ...) -> None: ...

class Backfill(_message.Message):
    __slots__ = ("messages_read", "messages_counted", "first_offset", "last_offset", "truncated")
    MESSAGES_READ_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_COUNTED_FIELD_NUMBER: _ClassVar[int]
    FIRST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    messages_read: int
    messages_counted: int
    first_offset: int
    last_offset: int
    truncated: bool
    def __init__(self, messages_read: _Optional[int] = ..., messages_counted: _Optional[int] = ..., first_offset: _Optional[int] = ..., last_offset: _Optional[int] = ..., truncated: _Optional[bool] = ...) -> None: ...

class GetViewRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetViewResponse(_message.Message):
    __slots__ = ("view",)
    VIEW_FIELD_NUMBER: _ClassVar[int]
    view: View
    def __init__(self, view: _Optional[_Union[View, _Mapping]] = ...) -> None: ...

class ListViewsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListViewsResponse(_message.Message):
    __slots__ = ("views",)
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedCompositeFieldContainer[View]
    def __init__(self, views: _Optional[_Iterable[_Union[View, _Mapping]]] = ...) -> None: ...

class DeleteViewRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteViewResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetKpisRequest(_message.Message):
    __slots__ = ("view", "window", "windows", "group", "if_none_match")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    IF_NONE_MATCH_FIELD_NUMBER: _ClassVar[int]
    view: str
    window: str
    windows: int
    group: str
    if_none_match: str
    def __init__(self, view: _Optional[str] = ..., window: _Optional[str] = ..., windows: _Optional[int] = ..., group: _Optional[str] = ..., if_none_match: _Optional[str] = ...) -> None: ...

class GetKpisResponse(_message.Message):
    __slots__ = ("not_modified", "etag", "view", "window", "windows")
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    not_modified: bool
    etag: str
    view: str
    window: str
    windows: _containers.RepeatedCompositeFieldContainer[KpiWindow]
    def __init__(self, not_modified: _Optional[bool] = ..., etag: _Optional[str] = ..., view: _Optional[str] = ..., window: _Optional[str] = ..., windows: _Optional[_Iterable[_Union[KpiWindow, _Mapping]]] = ...) -> None: ...

class KpiWindow(_message.Message):
    __slots__ = ("start", "end", "groups")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    groups: _containers.RepeatedCompositeFieldContainer[KpiGroup]
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[KpiGroup, _Mapping]]] = ...) -> None: ...

class KpiGroup(_message.Message):
    __slots__ = ("kind", "name", "messages", "measures")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MEASURES_FIELD_NUMBER: _ClassVar[int]
    kind: KpiGroupKind
    name: str
    messages: int
    measures: _containers.RepeatedCompositeFieldContainer[KpiMeasure]
    def __init__(self, kind: _Optional[_Union[KpiGroupKind, str]] = ..., name: _Optional[str] = ..., messages: _Optional[int] = ..., measures: _Optional[_Iterable[_Union[KpiMeasure, _Mapping]]] = ...) -> None: ...

class KpiMeasure(_message.Message):
    __slots__ = ("name", "count", "sum", "avg", "min", "max", "p50", "p90", "p95", "p99")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    AVG_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P90_FIELD_NUMBER: _ClassVar[int]
    P95_FIELD_NUMBER: _ClassVar[int]
    P99_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    sum: float
    avg: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., sum: _Optional[float] = ..., avg: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., p50: _Optional[float] = ..., p90: _Optional[float] = ..., p95: _Optional[float] = ..., p99: _Optional[float] = ...) -> None: ...

class WatchKpisRequest(_message.Message):
    __slots__ = ("view", "window", "windows", "group", "min_interval")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    view: str
    window: str
    windows: int
    group: str
    min_interval: _duration_pb2.Duration
    def __init__(self, view: _Optional[str] = ..., window: _Optional[str] = ..., windows: _Optional[int] = ..., group: _Optional[str] = ..., min_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WatchKpisResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: GetKpisResponse
    def __init__(self, values: _Optional[_Union[GetKpisResponse, _Mapping]] = ...) -> None: ...
