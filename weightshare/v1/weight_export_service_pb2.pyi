import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from weightshare.v1 import tensors_pb2 as _tensors_pb2
from weightshare.v1 import update_mode_pb2 as _update_mode_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpdatePhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_PHASE_UNSPECIFIED: _ClassVar[UpdatePhase]
    UPDATE_PHASE_BEGUN: _ClassVar[UpdatePhase]
    UPDATE_PHASE_COMMITTED: _ClassVar[UpdatePhase]
    UPDATE_PHASE_ABORTED: _ClassVar[UpdatePhase]

class ExportEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_EVENT_KIND_UNSPECIFIED: _ClassVar[ExportEventKind]
    EXPORT_EVENT_KIND_WEIGHTS_MAY_BE_TORN: _ClassVar[ExportEventKind]
    EXPORT_EVENT_KIND_WEIGHTS_CONSISTENT: _ClassVar[ExportEventKind]
    EXPORT_EVENT_KIND_PREFIX_CACHE_NOT_RESET: _ClassVar[ExportEventKind]
    EXPORT_EVENT_KIND_STREAM_BROKEN_WHILE_PAUSED: _ClassVar[ExportEventKind]
    EXPORT_EVENT_KIND_STREAM_BROKEN: _ClassVar[ExportEventKind]
    EXPORT_EVENT_KIND_PAUSE_TIMEOUT: _ClassVar[ExportEventKind]
    EXPORT_EVENT_KIND_SERVER_SHUTDOWN: _ClassVar[ExportEventKind]
    EXPORT_EVENT_KIND_TRAINER_GONE: _ClassVar[ExportEventKind]
    EXPORT_EVENT_KIND_WRITER_TAKEN_OVER: _ClassVar[ExportEventKind]
UPDATE_PHASE_UNSPECIFIED: UpdatePhase
UPDATE_PHASE_BEGUN: UpdatePhase
UPDATE_PHASE_COMMITTED: UpdatePhase
UPDATE_PHASE_ABORTED: UpdatePhase
EXPORT_EVENT_KIND_UNSPECIFIED: ExportEventKind
EXPORT_EVENT_KIND_WEIGHTS_MAY_BE_TORN: ExportEventKind
EXPORT_EVENT_KIND_WEIGHTS_CONSISTENT: ExportEventKind
EXPORT_EVENT_KIND_PREFIX_CACHE_NOT_RESET: ExportEventKind
EXPORT_EVENT_KIND_STREAM_BROKEN_WHILE_PAUSED: ExportEventKind
EXPORT_EVENT_KIND_STREAM_BROKEN: ExportEventKind
EXPORT_EVENT_KIND_PAUSE_TIMEOUT: ExportEventKind
EXPORT_EVENT_KIND_SERVER_SHUTDOWN: ExportEventKind
EXPORT_EVENT_KIND_TRAINER_GONE: ExportEventKind
EXPORT_EVENT_KIND_WRITER_TAKEN_OVER: ExportEventKind

class GetModelInfoRequest(_message.Message):
    __slots__ = ("tp_rank",)
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    tp_rank: int
    def __init__(self, tp_rank: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("contract_version", "identity", "update_mode")
    CONTRACT_VERSION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MODE_FIELD_NUMBER: _ClassVar[int]
    contract_version: str
    identity: _tensors_pb2.ModelIdentity
    update_mode: _update_mode_pb2.UpdateMode
    def __init__(self, contract_version: _Optional[str] = ..., identity: _Optional[_Union[_tensors_pb2.ModelIdentity, _Mapping]] = ..., update_mode: _Optional[_Union[_update_mode_pb2.UpdateMode, str]] = ...) -> None: ...

class GetLayoutRequest(_message.Message):
    __slots__ = ("tp_rank",)
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    tp_rank: int
    def __init__(self, tp_rank: _Optional[int] = ...) -> None: ...

class GetLayoutResponse(_message.Message):
    __slots__ = ("parameters", "engine_tensors", "instance_id")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.ParameterLayout]
    engine_tensors: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.EngineTensor]
    instance_id: str
    def __init__(self, parameters: _Optional[_Iterable[_Union[_tensors_pb2.ParameterLayout, _Mapping]]] = ..., engine_tensors: _Optional[_Iterable[_Union[_tensors_pb2.EngineTensor, _Mapping]]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class StreamHandlesRequest(_message.Message):
    __slots__ = ("tp_rank", "batch_size", "session_id")
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tp_rank: int
    batch_size: int
    session_id: str
    def __init__(self, tp_rank: _Optional[int] = ..., batch_size: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class StreamHandlesResponse(_message.Message):
    __slots__ = ("storages", "views", "total_views", "instance_id")
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VIEWS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    storages: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.StorageHandle]
    views: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorView]
    total_views: int
    instance_id: str
    def __init__(self, storages: _Optional[_Iterable[_Union[_tensors_pb2.StorageHandle, _Mapping]]] = ..., views: _Optional[_Iterable[_Union[_tensors_pb2.TensorView, _Mapping]]] = ..., total_views: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class AttachTrainerRequest(_message.Message):
    __slots__ = ("trainer_name", "host_id", "pid", "expected_instance_id", "read_only", "take_over")
    TRAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    TAKE_OVER_FIELD_NUMBER: _ClassVar[int]
    trainer_name: str
    host_id: str
    pid: int
    expected_instance_id: str
    read_only: bool
    take_over: bool
    def __init__(self, trainer_name: _Optional[str] = ..., host_id: _Optional[str] = ..., pid: _Optional[int] = ..., expected_instance_id: _Optional[str] = ..., read_only: _Optional[bool] = ..., take_over: _Optional[bool] = ...) -> None: ...

class AttachTrainerResponse(_message.Message):
    __slots__ = ("session_id", "identity")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    identity: _tensors_pb2.ModelIdentity
    def __init__(self, session_id: _Optional[str] = ..., identity: _Optional[_Union[_tensors_pb2.ModelIdentity, _Mapping]] = ...) -> None: ...

class DetachTrainerRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DetachTrainerResponse(_message.Message):
    __slots__ = ("remaining_trainers",)
    REMAINING_TRAINERS_FIELD_NUMBER: _ClassVar[int]
    remaining_trainers: int
    def __init__(self, remaining_trainers: _Optional[int] = ...) -> None: ...

class BeginUpdate(_message.Message):
    __slots__ = ("step", "max_pause_seconds", "max_pause_duration")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_PAUSE_DURATION_FIELD_NUMBER: _ClassVar[int]
    step: int
    max_pause_seconds: float
    max_pause_duration: _duration_pb2.Duration
    def __init__(self, step: _Optional[int] = ..., max_pause_seconds: _Optional[float] = ..., max_pause_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class HeartbeatUpdate(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class CommitUpdate(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class AbortUpdate(_message.Message):
    __slots__ = ("reason", "weights_untouched")
    REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_UNTOUCHED_FIELD_NUMBER: _ClassVar[int]
    reason: str
    weights_untouched: bool
    def __init__(self, reason: _Optional[str] = ..., weights_untouched: _Optional[bool] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("session_id", "begin", "commit", "abort", "heartbeat")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    begin: BeginUpdate
    commit: CommitUpdate
    abort: AbortUpdate
    heartbeat: HeartbeatUpdate
    def __init__(self, session_id: _Optional[str] = ..., begin: _Optional[_Union[BeginUpdate, _Mapping]] = ..., commit: _Optional[_Union[CommitUpdate, _Mapping]] = ..., abort: _Optional[_Union[AbortUpdate, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatUpdate, _Mapping]] = ...) -> None: ...

class UpdateWeightsResponse(_message.Message):
    __slots__ = ("phase", "weights_version", "step", "paused_seconds", "pause_wait_seconds", "mode", "weights_torn", "paused_duration", "pause_wait_duration")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_TORN_FIELD_NUMBER: _ClassVar[int]
    PAUSED_DURATION_FIELD_NUMBER: _ClassVar[int]
    PAUSE_WAIT_DURATION_FIELD_NUMBER: _ClassVar[int]
    phase: UpdatePhase
    weights_version: int
    step: int
    paused_seconds: float
    pause_wait_seconds: float
    mode: _update_mode_pb2.UpdateMode
    weights_torn: bool
    paused_duration: _duration_pb2.Duration
    pause_wait_duration: _duration_pb2.Duration
    def __init__(self, phase: _Optional[_Union[UpdatePhase, str]] = ..., weights_version: _Optional[int] = ..., step: _Optional[int] = ..., paused_seconds: _Optional[float] = ..., pause_wait_seconds: _Optional[float] = ..., mode: _Optional[_Union[_update_mode_pb2.UpdateMode, str]] = ..., weights_torn: _Optional[bool] = ..., paused_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., pause_wait_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetExportStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttachedTrainer(_message.Message):
    __slots__ = ("session_id", "trainer_name", "pid", "attached_seconds", "read_only", "attached_duration")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_DURATION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    trainer_name: str
    pid: int
    attached_seconds: float
    read_only: bool
    attached_duration: _duration_pb2.Duration
    def __init__(self, session_id: _Optional[str] = ..., trainer_name: _Optional[str] = ..., pid: _Optional[int] = ..., attached_seconds: _Optional[float] = ..., read_only: _Optional[bool] = ..., attached_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ExportEvent(_message.Message):
    __slots__ = ("unix_time", "kind", "message", "time", "event_kind")
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    EVENT_KIND_FIELD_NUMBER: _ClassVar[int]
    unix_time: float
    kind: str
    message: str
    time: _timestamp_pb2.Timestamp
    event_kind: ExportEventKind
    def __init__(self, unix_time: _Optional[float] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., event_kind: _Optional[_Union[ExportEventKind, str]] = ...) -> None: ...

class GetExportStatusResponse(_message.Message):
    __slots__ = ("identity", "paused", "update_in_progress", "update_mode", "trainers", "events", "commits", "aborts", "total_paused_seconds", "weights_torn", "torn_step", "total_paused_duration")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    UPDATE_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MODE_FIELD_NUMBER: _ClassVar[int]
    TRAINERS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    ABORTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAUSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_TORN_FIELD_NUMBER: _ClassVar[int]
    TORN_STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAUSED_DURATION_FIELD_NUMBER: _ClassVar[int]
    identity: _tensors_pb2.ModelIdentity
    paused: bool
    update_in_progress: bool
    update_mode: _update_mode_pb2.UpdateMode
    trainers: _containers.RepeatedCompositeFieldContainer[AttachedTrainer]
    events: _containers.RepeatedCompositeFieldContainer[ExportEvent]
    commits: int
    aborts: int
    total_paused_seconds: float
    weights_torn: bool
    torn_step: int
    total_paused_duration: _duration_pb2.Duration
    def __init__(self, identity: _Optional[_Union[_tensors_pb2.ModelIdentity, _Mapping]] = ..., paused: _Optional[bool] = ..., update_in_progress: _Optional[bool] = ..., update_mode: _Optional[_Union[_update_mode_pb2.UpdateMode, str]] = ..., trainers: _Optional[_Iterable[_Union[AttachedTrainer, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[ExportEvent, _Mapping]]] = ..., commits: _Optional[int] = ..., aborts: _Optional[int] = ..., total_paused_seconds: _Optional[float] = ..., weights_torn: _Optional[bool] = ..., torn_step: _Optional[int] = ..., total_paused_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
