import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scope(_message.Message):
    __slots__ = ("publish", "subscribe", "entity_read", "entity_update", "admin", "schema", "kpi")
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_READ_FIELD_NUMBER: _ClassVar[int]
    ENTITY_UPDATE_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    KPI_FIELD_NUMBER: _ClassVar[int]
    publish: _containers.RepeatedScalarFieldContainer[str]
    subscribe: _containers.RepeatedScalarFieldContainer[str]
    entity_read: _containers.RepeatedScalarFieldContainer[str]
    entity_update: _containers.RepeatedScalarFieldContainer[str]
    admin: bool
    schema: bool
    kpi: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, publish: _Optional[_Iterable[str]] = ..., subscribe: _Optional[_Iterable[str]] = ..., entity_read: _Optional[_Iterable[str]] = ..., entity_update: _Optional[_Iterable[str]] = ..., admin: _Optional[bool] = ..., schema: _Optional[bool] = ..., kpi: _Optional[_Iterable[str]] = ...) -> None: ...

class IssueTokenRequest(_message.Message):
    __slots__ = ("client_id", "client_secret", "subject", "scope", "ttl_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    client_secret: str
    subject: str
    scope: Scope
    ttl_seconds: int
    def __init__(self, client_id: _Optional[str] = ..., client_secret: _Optional[str] = ..., subject: _Optional[str] = ..., scope: _Optional[_Union[Scope, _Mapping]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("access_token", "token_type", "expires_at", "expires_in_seconds", "scope")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    token_type: str
    expires_at: _timestamp_pb2.Timestamp
    expires_in_seconds: int
    scope: Scope
    def __init__(self, access_token: _Optional[str] = ..., token_type: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_in_seconds: _Optional[int] = ..., scope: _Optional[_Union[Scope, _Mapping]] = ...) -> None: ...
