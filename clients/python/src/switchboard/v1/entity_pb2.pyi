import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from switchboard.v1 import broker_pb2 as _broker_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntityKey(_message.Message):
    __slots__ = ("type", "id")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    type: str
    id: str
    def __init__(self, type: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class WriteStamp(_message.Message):
    __slots__ = ("timestamp_ms", "version", "writer")
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    timestamp_ms: int
    version: int
    writer: str
    def __init__(self, timestamp_ms: _Optional[int] = ..., version: _Optional[int] = ..., writer: _Optional[str] = ...) -> None: ...

class UpdateEntityRequest(_message.Message):
    __slots__ = ("key", "fields", "stamp", "expected_version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    STAMP_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    key: EntityKey
    fields: bytes
    stamp: WriteStamp
    expected_version: int
    def __init__(self, key: _Optional[_Union[EntityKey, _Mapping]] = ..., fields: _Optional[bytes] = ..., stamp: _Optional[_Union[WriteStamp, _Mapping]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class DeleteEntityRequest(_message.Message):
    __slots__ = ("key", "stamp", "expected_version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    STAMP_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    key: EntityKey
    stamp: WriteStamp
    expected_version: int
    def __init__(self, key: _Optional[_Union[EntityKey, _Mapping]] = ..., stamp: _Optional[_Union[WriteStamp, _Mapping]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class EntityResponse(_message.Message):
    __slots__ = ("entity",)
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    entity: Entity
    def __init__(self, entity: _Optional[_Union[Entity, _Mapping]] = ...) -> None: ...

class GetEntityRequest(_message.Message):
    __slots__ = ("key", "if_none_match", "stale_ok")
    KEY_FIELD_NUMBER: _ClassVar[int]
    IF_NONE_MATCH_FIELD_NUMBER: _ClassVar[int]
    STALE_OK_FIELD_NUMBER: _ClassVar[int]
    key: EntityKey
    if_none_match: str
    stale_ok: bool
    def __init__(self, key: _Optional[_Union[EntityKey, _Mapping]] = ..., if_none_match: _Optional[str] = ..., stale_ok: _Optional[bool] = ...) -> None: ...

class GetEntityResponse(_message.Message):
    __slots__ = ("not_modified", "entity")
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    not_modified: bool
    entity: Entity
    def __init__(self, not_modified: _Optional[bool] = ..., entity: _Optional[_Union[Entity, _Mapping]] = ...) -> None: ...

class Entity(_message.Message):
    __slots__ = ("key", "fields", "version", "etag", "deleted", "updated_at", "last_stamp")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_STAMP_FIELD_NUMBER: _ClassVar[int]
    key: EntityKey
    fields: bytes
    version: int
    etag: str
    deleted: bool
    updated_at: _timestamp_pb2.Timestamp
    last_stamp: WriteStamp
    def __init__(self, key: _Optional[_Union[EntityKey, _Mapping]] = ..., fields: _Optional[bytes] = ..., version: _Optional[int] = ..., etag: _Optional[str] = ..., deleted: _Optional[bool] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_stamp: _Optional[_Union[WriteStamp, _Mapping]] = ...) -> None: ...

class WatchEntitiesRequest(_message.Message):
    __slots__ = ("pattern", "policy", "min_interval_ms")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    policy: _broker_pb2.FlowPolicy
    min_interval_ms: int
    def __init__(self, pattern: _Optional[str] = ..., policy: _Optional[_Union[_broker_pb2.FlowPolicy, str]] = ..., min_interval_ms: _Optional[int] = ...) -> None: ...

class EntityEvent(_message.Message):
    __slots__ = ("snapshot", "snapshot_complete", "change")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    snapshot: Entity
    snapshot_complete: SnapshotComplete
    change: Entity
    def __init__(self, snapshot: _Optional[_Union[Entity, _Mapping]] = ..., snapshot_complete: _Optional[_Union[SnapshotComplete, _Mapping]] = ..., change: _Optional[_Union[Entity, _Mapping]] = ...) -> None: ...

class SnapshotComplete(_message.Message):
    __slots__ = ("entities",)
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    entities: int
    def __init__(self, entities: _Optional[int] = ...) -> None: ...
