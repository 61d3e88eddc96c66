from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_MODE_UNSPECIFIED: _ClassVar[UpdateMode]
    UPDATE_MODE_STRICT: _ClassVar[UpdateMode]
    UPDATE_MODE_CONCURRENT: _ClassVar[UpdateMode]
UPDATE_MODE_UNSPECIFIED: UpdateMode
UPDATE_MODE_STRICT: UpdateMode
UPDATE_MODE_CONCURRENT: UpdateMode
