"""torch dtype <-> contract `weightshare.v1.DType` conversion, in one place.

Relies on the generated stubs (`weightshare.v1.tensors_pb2`); torch is imported inside the functions,
so modules that only speak protobuf can import this one without paying for torch.

Run its tests as: .venv/bin/python -m pytest tests/test_layout.py -k dtype
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from weightshare.v1 import tensors_pb2

if TYPE_CHECKING:
    import torch

# torch dtype attribute name -> proto enum value. Names, not dtype objects, so no torch import here.
_TORCH_NAME_TO_PROTO = {
    "float32": tensors_pb2.D_TYPE_FLOAT32,
    "bfloat16": tensors_pb2.D_TYPE_BFLOAT16,
    "float16": tensors_pb2.D_TYPE_FLOAT16,
    "float64": tensors_pb2.D_TYPE_FLOAT64,
    "int8": tensors_pb2.D_TYPE_INT8,
    "uint8": tensors_pb2.D_TYPE_UINT8,
    "int32": tensors_pb2.D_TYPE_INT32,
    "int64": tensors_pb2.D_TYPE_INT64,
    "bool": tensors_pb2.D_TYPE_BOOL,
}
_PROTO_TO_TORCH_NAME = {value: name for name, value in _TORCH_NAME_TO_PROTO.items()}


def to_proto_dtype(dtype: torch.dtype) -> int:
    """The `DType` enum value of a torch dtype; ValueError for dtypes the contract cannot carry."""
    name = str(dtype).removeprefix("torch.")
    if name not in _TORCH_NAME_TO_PROTO:
        raise ValueError(
            f"dtype {dtype} has no weightshare.v1.DType; supported: {', '.join(_TORCH_NAME_TO_PROTO)}"
        )
    return _TORCH_NAME_TO_PROTO[name]


def from_proto_dtype(value: int) -> torch.dtype:
    """The torch dtype of a `DType` enum value; ValueError for D_TYPE_UNSPECIFIED and unknown values."""
    import torch

    if value not in _PROTO_TO_TORCH_NAME:
        label = tensors_pb2.DType.Name(value) if value in tensors_pb2.DType.values() else str(value)
        raise ValueError(f"DType {label} does not name a tensor element type")
    return getattr(torch, _PROTO_TO_TORCH_NAME[value])
