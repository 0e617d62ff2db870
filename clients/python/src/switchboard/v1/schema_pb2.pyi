import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SchemaPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEMA_POLICY_UNSPECIFIED: _ClassVar[SchemaPolicy]
    SCHEMA_POLICY_ENFORCE: _ClassVar[SchemaPolicy]
    SCHEMA_POLICY_WARN: _ClassVar[SchemaPolicy]
    SCHEMA_POLICY_OFF: _ClassVar[SchemaPolicy]
SCHEMA_POLICY_UNSPECIFIED: SchemaPolicy
SCHEMA_POLICY_ENFORCE: SchemaPolicy
SCHEMA_POLICY_WARN: SchemaPolicy
SCHEMA_POLICY_OFF: SchemaPolicy

class Schema(_message.Message):
    __slots__ = ("pattern", "version", "document", "policy", "registered_at", "registered_by")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_BY_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    version: str
    document: str
    policy: SchemaPolicy
    registered_at: _timestamp_pb2.Timestamp
    registered_by: str
    def __init__(self, pattern: _Optional[str] = ..., version: _Optional[str] = ..., document: _Optional[str] = ..., policy: _Optional[_Union[SchemaPolicy, str]] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., registered_by: _Optional[str] = ...) -> None: ...

class SchemaFailure(_message.Message):
    __slots__ = ("instance_path", "keyword", "message")
    INSTANCE_PATH_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    instance_path: str
    keyword: str
    message: str
    def __init__(self, instance_path: _Optional[str] = ..., keyword: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class FailingMessage(_message.Message):
    __slots__ = ("offset", "channel", "schema_version", "failures")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    channel: str
    schema_version: str
    failures: _containers.RepeatedCompositeFieldContainer[SchemaFailure]
    def __init__(self, offset: _Optional[int] = ..., channel: _Optional[str] = ..., schema_version: _Optional[str] = ..., failures: _Optional[_Iterable[_Union[SchemaFailure, _Mapping]]] = ...) -> None: ...

class CompatibilityReport(_message.Message):
    __slots__ = ("checked", "failing", "examples", "truncated")
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    FAILING_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    checked: int
    failing: int
    examples: _containers.RepeatedCompositeFieldContainer[FailingMessage]
    truncated: bool
    def __init__(self, checked: _Optional[int] = ..., failing: _Optional[int] = ..., examples: _Optional[_Iterable[_Union[FailingMessage, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class PutSchemaRequest(_message.Message):
    __slots__ = ("pattern", "version", "document", "policy", "require_compatible")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_COMPATIBLE_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    version: str
    document: str
    policy: SchemaPolicy
    require_compatible: bool
    def __init__(self, pattern: _Optional[str] = ..., version: _Optional[str] = ..., document: _Optional[str] = ..., policy: _Optional[_Union[SchemaPolicy, str]] = ..., require_compatible: _Optional[bool] = ...) -> None: ...

class PutSchemaResponse(_message.Message):
    __slots__ = ("schema", "replaced", "compatibility")
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    COMPATIBILITY_FIELD_NUMBER: _ClassVar[int]
    schema: Schema
    replaced: bool
    compatibility: CompatibilityReport
    def __init__(self, schema: _Optional[_Union[Schema, _Mapping]] = ..., replaced: _Optional[bool] = ..., compatibility: _Optional[_Union[CompatibilityReport, _Mapping]] = ...) -> None: ...

class GetSchemaRequest(_message.Message):
    __slots__ = ("pattern", "version")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    version: str
    def __init__(self, pattern: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class GetSchemaResponse(_message.Message):
    __slots__ = ("schema",)
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    schema: Schema
    def __init__(self, schema: _Optional[_Union[Schema, _Mapping]] = ...) -> None: ...

class ListSchemasRequest(_message.Message):
    __slots__ = ("pattern", "include_documents")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    include_documents: bool
    def __init__(self, pattern: _Optional[str] = ..., include_documents: _Optional[bool] = ...) -> None: ...

class ListSchemasResponse(_message.Message):
    __slots__ = ("schemas",)
    SCHEMAS_FIELD_NUMBER: _ClassVar[int]
    schemas: _containers.RepeatedCompositeFieldContainer[Schema]
    def __init__(self, schemas: _Optional[_Iterable[_Union[Schema, _Mapping]]] = ...) -> None: ...

class DeleteSchemaRequest(_message.Message):
    __slots__ = ("pattern", "version")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    version: str
    def __init__(self, pattern: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class DeleteSchemaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckSchemaRequest(_message.Message):
    __slots__ = ("channel", "payload", "content_type", "schema_version")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    channel: str
    payload: bytes
    content_type: str
    schema_version: str
    def __init__(self, channel: _Optional[str] = ..., payload: _Optional[bytes] = ..., content_type: _Optional[str] = ..., schema_version: _Optional[str] = ...) -> None: ...

class CheckSchemaResponse(_message.Message):
    __slots__ = ("valid", "pattern", "schema_version", "policy", "failures", "reason")
    VALID_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    pattern: str
    schema_version: str
    policy: SchemaPolicy
    failures: _containers.RepeatedCompositeFieldContainer[SchemaFailure]
    reason: str
    def __init__(self, valid: _Optional[bool] = ..., pattern: _Optional[str] = ..., schema_version: _Optional[str] = ..., policy: _Optional[_Union[SchemaPolicy, str]] = ..., failures: _Optional[_Iterable[_Union[SchemaFailure, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...
