from protos.fedcoord.v1 import common_pb2 as _common_pb2
from protos.fedcoord.v1 import secagg_pb2 as _secagg_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_FIT: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
    TASK_KIND_SECAGG: _ClassVar[TaskKind]

class ReceiptStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECEIPT_STATUS_UNSPECIFIED: _ClassVar[ReceiptStatus]
    RECEIPT_STATUS_PENDING: _ClassVar[ReceiptStatus]
    RECEIPT_STATUS_INCLUDED: _ClassVar[ReceiptStatus]
    RECEIPT_STATUS_NOT_INCLUDED: _ClassVar[ReceiptStatus]

class ProofSide(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROOF_SIDE_UNSPECIFIED: _ClassVar[ProofSide]
    PROOF_SIDE_LEFT: _ClassVar[ProofSide]
    PROOF_SIDE_RIGHT: _ClassVar[ProofSide]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_FIT: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_KIND_SECAGG: TaskKind
RECEIPT_STATUS_UNSPECIFIED: ReceiptStatus
RECEIPT_STATUS_PENDING: ReceiptStatus
RECEIPT_STATUS_INCLUDED: ReceiptStatus
RECEIPT_STATUS_NOT_INCLUDED: ReceiptStatus
PROOF_SIDE_UNSPECIFIED: ProofSide
PROOF_SIDE_LEFT: ProofSide
PROOF_SIDE_RIGHT: ProofSide

class EnrollRequest(_message.Message):
    __slots__ = ("site_id", "token", "public_key", "properties")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    token: str
    public_key: bytes
    properties: _containers.ScalarMap[str, str]
    def __init__(self, site_id: _Optional[str] = ..., token: _Optional[str] = ..., public_key: _Optional[bytes] = ..., properties: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("site_id", "coordinator_id", "heartbeat_interval_s", "coordinator_public_key")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    coordinator_id: str
    heartbeat_interval_s: int
    coordinator_public_key: bytes
    def __init__(self, site_id: _Optional[str] = ..., coordinator_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[int] = ..., coordinator_public_key: _Optional[bytes] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("site_id", "cached_model_digest", "wait_s")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    cached_model_digest: str
    wait_s: int
    def __init__(self, site_id: _Optional[str] = ..., cached_model_digest: _Optional[str] = ..., wait_s: _Optional[int] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("task_id", "run_id", "round", "kind", "config_json", "model_digest", "model", "deadline_unix", "secagg")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    run_id: str
    round: int
    kind: TaskKind
    config_json: str
    model_digest: str
    model: _common_pb2.PayloadHeader
    deadline_unix: float
    secagg: _secagg_pb2.SecAggTask
    def __init__(self, task_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., config_json: _Optional[str] = ..., model_digest: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.PayloadHeader, _Mapping]] = ..., deadline_unix: _Optional[float] = ..., secagg: _Optional[_Union[_secagg_pb2.SecAggTask, _Mapping]] = ...) -> None: ...

class NoTask(_message.Message):
    __slots__ = ("retry_after_ms",)
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    retry_after_ms: int
    def __init__(self, retry_after_ms: _Optional[int] = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("header", "chunk", "none")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    chunk: _common_pb2.Chunk
    none: NoTask
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ..., none: _Optional[_Union[NoTask, _Mapping]] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("site_id", "task_id", "num_examples", "metrics", "update", "error", "secagg", "profile")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    task_id: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    update: _common_pb2.PayloadHeader
    error: str
    secagg: _secagg_pb2.SecAggReply
    profile: DataProfile
    def __init__(self, site_id: _Optional[str] = ..., task_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., update: _Optional[_Union[_common_pb2.PayloadHeader, _Mapping]] = ..., error: _Optional[str] = ..., secagg: _Optional[_Union[_secagg_pb2.SecAggReply, _Mapping]] = ..., profile: _Optional[_Union[DataProfile, _Mapping]] = ...) -> None: ...

class DataProfile(_message.Message):
    __slots__ = ("num_examples", "label_counts", "bins", "feature_counts")
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    num_examples: int
    label_counts: _containers.RepeatedScalarFieldContainer[float]
    bins: int
    feature_counts: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, num_examples: _Optional[int] = ..., label_counts: _Optional[_Iterable[float]] = ..., bins: _Optional[int] = ..., feature_counts: _Optional[_Iterable[float]] = ...) -> None: ...

class ResultMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: _common_pb2.Chunk
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("site_id", "task_id")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    task_id: str
    def __init__(self, site_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("task_active",)
    TASK_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    task_active: bool
    def __init__(self, task_active: _Optional[bool] = ...) -> None: ...

class ReceiptRequest(_message.Message):
    __slots__ = ("site_id", "run_id", "round")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    run_id: str
    round: int
    def __init__(self, site_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class ProofStep(_message.Message):
    __slots__ = ("sibling", "side")
    SIBLING_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    sibling: bytes
    side: ProofSide
    def __init__(self, sibling: _Optional[bytes] = ..., side: _Optional[_Union[ProofSide, str]] = ...) -> None: ...

class ReceiptReply(_message.Message):
    __slots__ = ("status", "statement_json", "statement_signature", "entry_signature", "proof", "coordinator_public_key")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    status: ReceiptStatus
    statement_json: str
    statement_signature: bytes
    entry_signature: bytes
    proof: _containers.RepeatedCompositeFieldContainer[ProofStep]
    coordinator_public_key: bytes
    def __init__(self, status: _Optional[_Union[ReceiptStatus, str]] = ..., statement_json: _Optional[str] = ..., statement_signature: _Optional[bytes] = ..., entry_signature: _Optional[bytes] = ..., proof: _Optional[_Iterable[_Union[ProofStep, _Mapping]]] = ..., coordinator_public_key: _Optional[bytes] = ...) -> None: ...
