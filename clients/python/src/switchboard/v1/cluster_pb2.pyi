from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AddLearnerRequest(_message.Message):
    __slots__ = ("id", "raft_address", "public_address")
    ID_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    id: int
    raft_address: str
    public_address: str
    def __init__(self, id: _Optional[int] = ..., raft_address: _Optional[str] = ..., public_address: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("leader_id", "term", "applied_index", "nodes")
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    leader_id: int
    term: int
    applied_index: int
    nodes: _containers.RepeatedCompositeFieldContainer[ClusterNode]
    def __init__(self, leader_id: _Optional[int] = ..., term: _Optional[int] = ..., applied_index: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[ClusterNode, _Mapping]]] = ...) -> None: ...

class ClusterNode(_message.Message):
    __slots__ = ("id", "raft_address", "public_address", "role", "matched_index")
    ID_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_INDEX_FIELD_NUMBER: _ClassVar[int]
    id: int
    raft_address: str
    public_address: str
    role: str
    matched_index: int
    def __init__(self, id: _Optional[int] = ..., raft_address: _Optional[str] = ..., public_address: _Optional[str] = ..., role: _Optional[str] = ..., matched_index: _Optional[int] = ...) -> None: ...
