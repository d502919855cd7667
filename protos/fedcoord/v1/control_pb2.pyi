from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRunRequest(_message.Message):
    __slots__ = ("experiment_yaml",)
    EXPERIMENT_YAML_FIELD_NUMBER: _ClassVar[int]
    experiment_yaml: str
    def __init__(self, experiment_yaml: _Optional[str] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("run_id", "name", "status", "rounds_completed", "rounds_total", "summary_json", "error")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    status: str
    rounds_completed: int
    rounds_total: int
    summary_json: str
    error: str
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[str] = ..., rounds_completed: _Optional[int] = ..., rounds_total: _Optional[int] = ..., summary_json: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRunsReply(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunInfo]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunInfo, _Mapping]]] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("run_id", "from_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    from_seq: int
    def __init__(self, run_id: _Optional[str] = ..., from_seq: _Optional[int] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("run_id", "seq", "kind", "message", "data_json", "time_unix")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    seq: int
    kind: str
    message: str
    data_json: str
    time_unix: float
    def __init__(self, run_id: _Optional[str] = ..., seq: _Optional[int] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., data_json: _Optional[str] = ..., time_unix: _Optional[float] = ...) -> None: ...

class ListSitesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteInfo(_message.Message):
    __slots__ = ("site_id", "status", "last_seen_unix", "online", "key_fingerprint", "token_expires_unix")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    status: str
    last_seen_unix: float
    online: bool
    key_fingerprint: str
    token_expires_unix: float
    def __init__(self, site_id: _Optional[str] = ..., status: _Optional[str] = ..., last_seen_unix: _Optional[float] = ..., online: _Optional[bool] = ..., key_fingerprint: _Optional[str] = ..., token_expires_unix: _Optional[float] = ...) -> None: ...

class ListSitesReply(_message.Message):
    __slots__ = ("sites",)
    SITES_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteInfo]
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteInfo, _Mapping]]] = ...) -> None: ...

class EnrollSiteRequest(_message.Message):
    __slots__ = ("site_id", "ttl_s")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    ttl_s: float
    def __init__(self, site_id: _Optional[str] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class EnrollSiteReply(_message.Message):
    __slots__ = ("site_id", "token", "expires_unix", "status")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    token: str
    expires_unix: float
    status: str
    def __init__(self, site_id: _Optional[str] = ..., token: _Optional[str] = ..., expires_unix: _Optional[float] = ..., status: _Optional[str] = ...) -> None: ...

class RevokeSiteRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class RevokeSiteReply(_message.Message):
    __slots__ = ("site", "changed")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    site: SiteInfo
    changed: bool
    def __init__(self, site: _Optional[_Union[SiteInfo, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...
