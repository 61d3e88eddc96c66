import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from weightshare.v1 import update_mode_pb2 as _update_mode_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProgressKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROGRESS_KIND_UNSPECIFIED: _ClassVar[ProgressKind]
    PROGRESS_KIND_STEP: _ClassVar[ProgressKind]
    PROGRESS_KIND_SKIPPED: _ClassVar[ProgressKind]
    PROGRESS_KIND_CHECKPOINT: _ClassVar[ProgressKind]
    PROGRESS_KIND_STOPPED: _ClassVar[ProgressKind]
PROGRESS_KIND_UNSPECIFIED: ProgressKind
PROGRESS_KIND_STEP: ProgressKind
PROGRESS_KIND_SKIPPED: ProgressKind
PROGRESS_KIND_CHECKPOINT: ProgressKind
PROGRESS_KIND_STOPPED: ProgressKind

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatExample(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenExample(_message.Message):
    __slots__ = ("input_ids", "loss_mask")
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    loss_mask: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, input_ids: _Optional[_Iterable[int]] = ..., loss_mask: _Optional[_Iterable[bool]] = ...) -> None: ...

class TextSegment(_message.Message):
    __slots__ = ("text", "train")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    text: str
    train: bool
    def __init__(self, text: _Optional[str] = ..., train: _Optional[bool] = ...) -> None: ...

class TextExample(_message.Message):
    __slots__ = ("segments", "add_eos")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ADD_EOS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[TextSegment]
    add_eos: bool
    def __init__(self, segments: _Optional[_Iterable[_Union[TextSegment, _Mapping]]] = ..., add_eos: _Optional[bool] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("example_id", "chat", "tokens", "text")
    EXAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    example_id: str
    chat: ChatExample
    tokens: TokenExample
    text: TextExample
    def __init__(self, example_id: _Optional[str] = ..., chat: _Optional[_Union[ChatExample, _Mapping]] = ..., tokens: _Optional[_Union[TokenExample, _Mapping]] = ..., text: _Optional[_Union[TextExample, _Mapping]] = ...) -> None: ...

class SubmitExamplesRequest(_message.Message):
    __slots__ = ("examples",)
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    def __init__(self, examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ...) -> None: ...

class SubmitExamplesResponse(_message.Message):
    __slots__ = ("example_ids", "pending_examples")
    EXAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    PENDING_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    example_ids: _containers.RepeatedScalarFieldContainer[str]
    pending_examples: int
    def __init__(self, example_ids: _Optional[_Iterable[str]] = ..., pending_examples: _Optional[int] = ...) -> None: ...

class TrainingOverrides(_message.Message):
    __slots__ = ("learning_rate", "max_steps", "examples_per_step", "update_mode")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MODE_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    max_steps: int
    examples_per_step: int
    update_mode: _update_mode_pb2.UpdateMode
    def __init__(self, learning_rate: _Optional[float] = ..., max_steps: _Optional[int] = ..., examples_per_step: _Optional[int] = ..., update_mode: _Optional[_Union[_update_mode_pb2.UpdateMode, str]] = ...) -> None: ...

class StartTrainingRequest(_message.Message):
    __slots__ = ("overrides",)
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    overrides: TrainingOverrides
    def __init__(self, overrides: _Optional[_Union[TrainingOverrides, _Mapping]] = ...) -> None: ...

class StartTrainingResponse(_message.Message):
    __slots__ = ("already_running", "step")
    ALREADY_RUNNING_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    already_running: bool
    step: int
    def __init__(self, already_running: _Optional[bool] = ..., step: _Optional[int] = ...) -> None: ...

class StopTrainingRequest(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: bool
    def __init__(self, checkpoint: _Optional[bool] = ...) -> None: ...

class StopTrainingResponse(_message.Message):
    __slots__ = ("step", "checkpoint_path")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    step: int
    checkpoint_path: str
    def __init__(self, step: _Optional[int] = ..., checkpoint_path: _Optional[str] = ...) -> None: ...

class StreamProgressRequest(_message.Message):
    __slots__ = ("include_history",)
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    include_history: bool
    def __init__(self, include_history: _Optional[bool] = ...) -> None: ...

class StreamProgressResponse(_message.Message):
    __slots__ = ("kind", "step", "loss", "tokens", "grad_norm", "learning_rate", "weights_version", "paused_seconds", "step_seconds", "tokens_per_second", "message", "pending_examples", "paused_duration", "step_duration")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PENDING_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PAUSED_DURATION_FIELD_NUMBER: _ClassVar[int]
    STEP_DURATION_FIELD_NUMBER: _ClassVar[int]
    kind: ProgressKind
    step: int
    loss: float
    tokens: int
    grad_norm: float
    learning_rate: float
    weights_version: int
    paused_seconds: float
    step_seconds: float
    tokens_per_second: float
    message: str
    pending_examples: int
    paused_duration: _duration_pb2.Duration
    step_duration: _duration_pb2.Duration
    def __init__(self, kind: _Optional[_Union[ProgressKind, str]] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., tokens: _Optional[int] = ..., grad_norm: _Optional[float] = ..., learning_rate: _Optional[float] = ..., weights_version: _Optional[int] = ..., paused_seconds: _Optional[float] = ..., step_seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., message: _Optional[str] = ..., pending_examples: _Optional[int] = ..., paused_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., step_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetTrainingStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTrainingStatusResponse(_message.Message):
    __slots__ = ("running", "step", "weights_version", "pending_examples", "trained_examples", "last_loss", "last_checkpoint", "skipped_steps", "inference_address", "inference_connected", "inference_problem", "last_error")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    PENDING_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAINED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    running: bool
    step: int
    weights_version: int
    pending_examples: int
    trained_examples: int
    last_loss: float
    last_checkpoint: str
    skipped_steps: int
    inference_address: str
    inference_connected: bool
    inference_problem: str
    last_error: str
    def __init__(self, running: _Optional[bool] = ..., step: _Optional[int] = ..., weights_version: _Optional[int] = ..., pending_examples: _Optional[int] = ..., trained_examples: _Optional[int] = ..., last_loss: _Optional[float] = ..., last_checkpoint: _Optional[str] = ..., skipped_steps: _Optional[int] = ..., inference_address: _Optional[str] = ..., inference_connected: _Optional[bool] = ..., inference_problem: _Optional[str] = ..., last_error: _Optional[str] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("path", "step", "weights_version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    weights_version: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ..., weights_version: _Optional[int] = ...) -> None: ...
