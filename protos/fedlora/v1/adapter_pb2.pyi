from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_UP: _ClassVar[Direction]
    DIRECTION_DOWN: _ClassVar[Direction]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_A: _ClassVar[Role]
    ROLE_B: _ClassVar[Role]
    ROLE_R: _ClassVar[Role]
    ROLE_G: _ClassVar[Role]
    ROLE_HEAD: _ClassVar[Role]
    ROLE_U: _ClassVar[Role]
    ROLE_V: _ClassVar[Role]
    ROLE_Y: _ClassVar[Role]
    ROLE_W: _ClassVar[Role]

class WireDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_DTYPE_UNSPECIFIED: _ClassVar[WireDType]
    WIRE_DTYPE_FLOAT32: _ClassVar[WireDType]
    WIRE_DTYPE_FLOAT16: _ClassVar[WireDType]
    WIRE_DTYPE_BFLOAT16: _ClassVar[WireDType]
DIRECTION_UNSPECIFIED: Direction
DIRECTION_UP: Direction
DIRECTION_DOWN: Direction
ROLE_UNSPECIFIED: Role
ROLE_A: Role
ROLE_B: Role
ROLE_R: Role
ROLE_G: Role
ROLE_HEAD: Role
ROLE_U: Role
ROLE_V: Role
ROLE_Y: Role
ROLE_W: Role
WIRE_DTYPE_UNSPECIFIED: WireDType
WIRE_DTYPE_FLOAT32: WireDType
WIRE_DTYPE_FLOAT16: WireDType
WIRE_DTYPE_BFLOAT16: WireDType

class Tensor(_message.Message):
    __slots__ = ("module", "role", "shape", "dtype", "data")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    module: str
    role: Role
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: WireDType
    data: bytes
    def __init__(self, module: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[WireDType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Privacy(_message.Message):
    __slots__ = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: str
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., accountant: _Optional[str] = ...) -> None: ...

class AdapterEnvelope(_message.Message):
    __slots__ = ("schema_version", "method", "round", "direction", "fingerprint", "node", "tensors", "num_examples", "scaling", "rank", "privacy", "extra", "tensor_count")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    method: str
    round: int
    direction: Direction
    fingerprint: str
    node: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    num_examples: int
    scaling: float
    rank: int
    privacy: Privacy
    extra: _containers.ScalarMap[str, str]
    tensor_count: int
    def __init__(self, schema_version: _Optional[int] = ..., method: _Optional[str] = ..., round: _Optional[int] = ..., direction: _Optional[_Union[Direction, str]] = ..., fingerprint: _Optional[str] = ..., node: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., num_examples: _Optional[int] = ..., scaling: _Optional[float] = ..., rank: _Optional[int] = ..., privacy: _Optional[_Union[Privacy, _Mapping]] = ..., extra: _Optional[_Mapping[str, str]] = ..., tensor_count: _Optional[int] = ...) -> None: ...
