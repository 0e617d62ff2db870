import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FlowPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOW_POLICY_UNSPECIFIED: _ClassVar[FlowPolicy]
    FLOW_POLICY_LOSSLESS: _ClassVar[FlowPolicy]
    FLOW_POLICY_CONFLATE: _ClassVar[FlowPolicy]
    FLOW_POLICY_DROP_OLDEST: _ClassVar[FlowPolicy]
FLOW_POLICY_UNSPECIFIED: FlowPolicy
FLOW_POLICY_LOSSLESS: FlowPolicy
FLOW_POLICY_CONFLATE: FlowPolicy
FLOW_POLICY_DROP_OLDEST: FlowPolicy

class PublishRequest(_message.Message):
    __slots__ = ("channel", "payload", "content_type", "schema_version", "correlation_id", "causation_id", "idempotency_key", "ttl_ms", "headers", "hops", "ephemeral")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    CAUSATION_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    payload: bytes
    content_type: str
    schema_version: str
    correlation_id: str
    causation_id: str
    idempotency_key: str
    ttl_ms: int
    headers: _containers.ScalarMap[str, str]
    hops: int
    ephemeral: bool
    def __init__(self, channel: _Optional[str] = ..., payload: _Optional[bytes] = ..., content_type: _Optional[str] = ..., schema_version: _Optional[str] = ..., correlation_id: _Optional[str] = ..., causation_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., headers: _Optional[_Mapping[str, str]] = ..., hops: _Optional[int] = ..., ephemeral: _Optional[bool] = ...) -> None: ...

class PublishAck(_message.Message):
    __slots__ = ("offset", "publish_time", "correlation_id", "duplicate")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    publish_time: _timestamp_pb2.Timestamp
    correlation_id: str
    duplicate: bool
    def __init__(self, offset: _Optional[int] = ..., publish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., correlation_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class PublishStreamAck(_message.Message):
    __slots__ = ("sequence", "ack", "refusal")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    ack: PublishAck
    refusal: Refusal
    def __init__(self, sequence: _Optional[int] = ..., ack: _Optional[_Union[PublishAck, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("code", "reason", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartPosition(_message.Message):
    __slots__ = ("latest", "earliest", "offset", "time")
    LATEST_FIELD_NUMBER: _ClassVar[int]
    EARLIEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    latest: Latest
    earliest: Earliest
    offset: int
    time: _timestamp_pb2.Timestamp
    def __init__(self, latest: _Optional[_Union[Latest, _Mapping]] = ..., earliest: _Optional[_Union[Earliest, _Mapping]] = ..., offset: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Latest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Earliest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("pattern", "start", "policy", "window", "min_interval_ms", "max_unacked", "durable_name", "ack_timeout_ms", "exclude_ephemeral", "max_batch")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_UNACKED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_NAME_FIELD_NUMBER: _ClassVar[int]
    ACK_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    start: StartPosition
    policy: FlowPolicy
    window: int
    min_interval_ms: int
    max_unacked: int
    durable_name: str
    ack_timeout_ms: int
    exclude_ephemeral: bool
    max_batch: int
    def __init__(self, pattern: _Optional[str] = ..., start: _Optional[_Union[StartPosition, _Mapping]] = ..., policy: _Optional[_Union[FlowPolicy, str]] = ..., window: _Optional[int] = ..., min_interval_ms: _Optional[int] = ..., max_unacked: _Optional[int] = ..., durable_name: _Optional[str] = ..., ack_timeout_ms: _Optional[int] = ..., exclude_ephemeral: _Optional[bool] = ..., max_batch: _Optional[int] = ...) -> None: ...

class SubscribeEvent(_message.Message):
    __slots__ = ("subscribed", "message", "gap", "batch")
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    subscribed: Subscribed
    message: Message
    gap: Gap
    batch: MessageBatch
    def __init__(self, subscribed: _Optional[_Union[Subscribed, _Mapping]] = ..., message: _Optional[_Union[Message, _Mapping]] = ..., gap: _Optional[_Union[Gap, _Mapping]] = ..., batch: _Optional[_Union[MessageBatch, _Mapping]] = ...) -> None: ...

class MessageBatch(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class Gap(_message.Message):
    __slots__ = ("from_offset", "to_offset", "count", "reason")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[Gap.Reason]
        REASON_DROPPED: _ClassVar[Gap.Reason]
        REASON_RETENTION: _ClassVar[Gap.Reason]
    REASON_UNSPECIFIED: Gap.Reason
    REASON_DROPPED: Gap.Reason
    REASON_RETENTION: Gap.Reason
    FROM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TO_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    from_offset: int
    to_offset: int
    count: int
    reason: Gap.Reason
    def __init__(self, from_offset: _Optional[int] = ..., to_offset: _Optional[int] = ..., count: _Optional[int] = ..., reason: _Optional[_Union[Gap.Reason, str]] = ...) -> None: ...

class Subscribed(_message.Message):
    __slots__ = ("next_offset", "subscription_id", "acked_offset")
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    ACKED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    next_offset: int
    subscription_id: int
    acked_offset: int
    def __init__(self, next_offset: _Optional[int] = ..., subscription_id: _Optional[int] = ..., acked_offset: _Optional[int] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("offset", "channel", "publish_time", "payload", "content_type", "schema_version", "correlation_id", "causation_id", "idempotency_key", "ttl_ms", "headers", "expires_at", "hops", "skipped", "redelivery", "ephemeral")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    CAUSATION_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    REDELIVERY_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    offset: int
    channel: str
    publish_time: _timestamp_pb2.Timestamp
    payload: bytes
    content_type: str
    schema_version: str
    correlation_id: str
    causation_id: str
    idempotency_key: str
    ttl_ms: int
    headers: _containers.ScalarMap[str, str]
    expires_at: _timestamp_pb2.Timestamp
    hops: int
    skipped: int
    redelivery: int
    ephemeral: bool
    def __init__(self, offset: _Optional[int] = ..., channel: _Optional[str] = ..., publish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., payload: _Optional[bytes] = ..., content_type: _Optional[str] = ..., schema_version: _Optional[str] = ..., correlation_id: _Optional[str] = ..., causation_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., headers: _Optional[_Mapping[str, str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hops: _Optional[int] = ..., skipped: _Optional[int] = ..., redelivery: _Optional[int] = ..., ephemeral: _Optional[bool] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("pattern", "to_offset", "to_time", "limit")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TO_TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    to_offset: int
    to_time: _timestamp_pb2.Timestamp
    limit: int
    def __init__(self, pattern: _Optional[str] = ..., to_offset: _Optional[int] = ..., to_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ..., **kwargs) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("messages", "next_offset")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    next_offset: int
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "node_id", "last_offset", "first_offset", "stored_bytes", "disk_bytes", "leader_id", "term", "applied_index", "loops_detected")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FIRST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LOOPS_DETECTED_FIELD_NUMBER: _ClassVar[int]
    version: str
    node_id: int
    last_offset: int
    first_offset: int
    stored_bytes: int
    disk_bytes: int
    leader_id: int
    term: int
    applied_index: int
    loops_detected: int
    def __init__(self, version: _Optional[str] = ..., node_id: _Optional[int] = ..., last_offset: _Optional[int] = ..., first_offset: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., leader_id: _Optional[int] = ..., term: _Optional[int] = ..., applied_index: _Optional[int] = ..., loops_detected: _Optional[int] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("subscription_id", "offsets")
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    subscription_id: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, subscription_id: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("pending", "acked_offset")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ACKED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    pending: int
    acked_offset: int
    def __init__(self, pending: _Optional[int] = ..., acked_offset: _Optional[int] = ...) -> None: ...

class ListSubscriptionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSubscriptionsResponse(_message.Message):
    __slots__ = ("subscriptions",)
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    subscriptions: _containers.RepeatedCompositeFieldContainer[SubscriptionInfo]
    def __init__(self, subscriptions: _Optional[_Iterable[_Union[SubscriptionInfo, _Mapping]]] = ...) -> None: ...

class SubscriptionInfo(_message.Message):
    __slots__ = ("subscription_id", "pattern", "policy", "durable_name", "next_offset", "lagging", "buffered_messages", "buffered_bytes", "peak_buffered_bytes", "buffered_bytes_limit", "pending", "delivered", "slow_switches", "waiting_for_credit")
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DURABLE_NAME_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAGGING_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_BUFFERED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_BYTES_LIMIT_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    SLOW_SWITCHES_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_CREDIT_FIELD_NUMBER: _ClassVar[int]
    subscription_id: int
    pattern: str
    policy: FlowPolicy
    durable_name: str
    next_offset: int
    lagging: bool
    buffered_messages: int
    buffered_bytes: int
    peak_buffered_bytes: int
    buffered_bytes_limit: int
    pending: int
    delivered: int
    slow_switches: int
    waiting_for_credit: bool
    def __init__(self, subscription_id: _Optional[int] = ..., pattern: _Optional[str] = ..., policy: _Optional[_Union[FlowPolicy, str]] = ..., durable_name: _Optional[str] = ..., next_offset: _Optional[int] = ..., lagging: _Optional[bool] = ..., buffered_messages: _Optional[int] = ..., buffered_bytes: _Optional[int] = ..., peak_buffered_bytes: _Optional[int] = ..., buffered_bytes_limit: _Optional[int] = ..., pending: _Optional[int] = ..., delivered: _Optional[int] = ..., slow_switches: _Optional[int] = ..., waiting_for_credit: _Optional[bool] = ...) -> None: ...

class ListConsumersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListConsumersResponse(_message.Message):
    __slots__ = ("consumers",)
    CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    consumers: _containers.RepeatedCompositeFieldContainer[ConsumerInfo]
    def __init__(self, consumers: _Optional[_Iterable[_Union[ConsumerInfo, _Mapping]]] = ...) -> None: ...

class GetConsumerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteConsumerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteConsumerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConsumerInfo(_message.Message):
    __slots__ = ("name", "pattern", "policy", "acked_offset", "pending", "redeliveries", "connected", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ACKED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    REDELIVERIES_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    pattern: str
    policy: FlowPolicy
    acked_offset: int
    pending: int
    redeliveries: int
    connected: bool
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., pattern: _Optional[str] = ..., policy: _Optional[_Union[FlowPolicy, str]] = ..., acked_offset: _Optional[int] = ..., pending: _Optional[int] = ..., redeliveries: _Optional[int] = ..., connected: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
