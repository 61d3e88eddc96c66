from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    D_TYPE_UNSPECIFIED: _ClassVar[DType]
    D_TYPE_FLOAT32: _ClassVar[DType]
    D_TYPE_BFLOAT16: _ClassVar[DType]
    D_TYPE_FLOAT16: _ClassVar[DType]
    D_TYPE_FLOAT64: _ClassVar[DType]
    D_TYPE_INT8: _ClassVar[DType]
    D_TYPE_UINT8: _ClassVar[DType]
    D_TYPE_INT32: _ClassVar[DType]
    D_TYPE_INT64: _ClassVar[DType]
    D_TYPE_BOOL: _ClassVar[DType]

class DeviceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_KIND_UNSPECIFIED: _ClassVar[DeviceKind]
    DEVICE_KIND_CPU: _ClassVar[DeviceKind]
    DEVICE_KIND_CUDA: _ClassVar[DeviceKind]
D_TYPE_UNSPECIFIED: DType
D_TYPE_FLOAT32: DType
D_TYPE_BFLOAT16: DType
D_TYPE_FLOAT16: DType
D_TYPE_FLOAT64: DType
D_TYPE_INT8: DType
D_TYPE_UINT8: DType
D_TYPE_INT32: DType
D_TYPE_INT64: DType
D_TYPE_BOOL: DType
DEVICE_KIND_UNSPECIFIED: DeviceKind
DEVICE_KIND_CPU: DeviceKind
DEVICE_KIND_CUDA: DeviceKind

class ModelIdentity(_message.Message):
    __slots__ = ("architecture", "hf_config_json", "model", "dtype", "tp_rank", "tp_size", "device_kind", "device_uuid", "host_id", "instance_id", "weights_version", "engine_version")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HF_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    hf_config_json: str
    model: str
    dtype: DType
    tp_rank: int
    tp_size: int
    device_kind: DeviceKind
    device_uuid: str
    host_id: str
    instance_id: str
    weights_version: int
    engine_version: str
    def __init__(self, architecture: _Optional[str] = ..., hf_config_json: _Optional[str] = ..., model: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., device_kind: _Optional[_Union[DeviceKind, str]] = ..., device_uuid: _Optional[str] = ..., host_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., weights_version: _Optional[int] = ..., engine_version: _Optional[str] = ...) -> None: ...

class EngineSlice(_message.Message):
    __slots__ = ("engine_tensor", "dim", "start", "length", "local_offset", "hf_start", "replica_ranks")
    ENGINE_TENSOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    HF_START_FIELD_NUMBER: _ClassVar[int]
    REPLICA_RANKS_FIELD_NUMBER: _ClassVar[int]
    engine_tensor: str
    dim: int
    start: int
    length: int
    local_offset: int
    hf_start: int
    replica_ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, engine_tensor: _Optional[str] = ..., dim: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., local_offset: _Optional[int] = ..., hf_start: _Optional[int] = ..., replica_ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class ParameterLayout(_message.Message):
    __slots__ = ("hf_name", "hf_shape", "hf_dtype", "engine_dtype", "tp_split_dim", "local_shape", "local_start", "slices", "zero_copy", "not_zero_copy_reason", "tied_to", "tp_rank", "tp_size")
    HF_NAME_FIELD_NUMBER: _ClassVar[int]
    HF_SHAPE_FIELD_NUMBER: _ClassVar[int]
    HF_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TP_SPLIT_DIM_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_START_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    ZERO_COPY_FIELD_NUMBER: _ClassVar[int]
    NOT_ZERO_COPY_REASON_FIELD_NUMBER: _ClassVar[int]
    TIED_TO_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    hf_name: str
    hf_shape: _containers.RepeatedScalarFieldContainer[int]
    hf_dtype: DType
    engine_dtype: DType
    tp_split_dim: int
    local_shape: _containers.RepeatedScalarFieldContainer[int]
    local_start: int
    slices: _containers.RepeatedCompositeFieldContainer[EngineSlice]
    zero_copy: bool
    not_zero_copy_reason: str
    tied_to: str
    tp_rank: int
    tp_size: int
    def __init__(self, hf_name: _Optional[str] = ..., hf_shape: _Optional[_Iterable[int]] = ..., hf_dtype: _Optional[_Union[DType, str]] = ..., engine_dtype: _Optional[_Union[DType, str]] = ..., tp_split_dim: _Optional[int] = ..., local_shape: _Optional[_Iterable[int]] = ..., local_start: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[EngineSlice, _Mapping]]] = ..., zero_copy: _Optional[bool] = ..., not_zero_copy_reason: _Optional[str] = ..., tied_to: _Optional[str] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ...) -> None: ...

class EngineTensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "hf_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HF_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    hf_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., hf_names: _Optional[_Iterable[str]] = ...) -> None: ...

class SharedMemoryHandle(_message.Message):
    __slots__ = ("path", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("mem_handle", "storage_offset_bytes", "storage_size_bytes", "device_uuid", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    MEM_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    mem_handle: bytes
    storage_offset_bytes: int
    storage_size_bytes: int
    device_uuid: str
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, mem_handle: _Optional[bytes] = ..., storage_offset_bytes: _Optional[int] = ..., storage_size_bytes: _Optional[int] = ..., device_uuid: _Optional[str] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class StorageHandle(_message.Message):
    __slots__ = ("index", "shared_memory", "cuda_ipc")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    index: int
    shared_memory: SharedMemoryHandle
    cuda_ipc: CudaIpcHandle
    def __init__(self, index: _Optional[int] = ..., shared_memory: _Optional[_Union[SharedMemoryHandle, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcHandle, _Mapping]] = ...) -> None: ...

class TensorView(_message.Message):
    __slots__ = ("engine_tensor", "storage_index", "byte_offset", "shape", "strides", "dtype")
    ENGINE_TENSOR_FIELD_NUMBER: _ClassVar[int]
    STORAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    BYTE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    engine_tensor: str
    storage_index: int
    byte_offset: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    strides: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, engine_tensor: _Optional[str] = ..., storage_index: _Optional[int] = ..., byte_offset: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., strides: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...
