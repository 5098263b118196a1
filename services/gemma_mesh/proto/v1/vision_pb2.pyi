from gemma_mesh.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RawImage(_message.Message):
    __slots__ = ("rgb", "width", "height")
    RGB_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    rgb: bytes
    width: int
    height: int
    def __init__(self, rgb: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("encoded", "raw", "max_soft_tokens", "timestamp_s", "video_frame")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    MAX_SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FRAME_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    max_soft_tokens: int
    timestamp_s: float
    video_frame: bool
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., max_soft_tokens: _Optional[int] = ..., timestamp_s: _Optional[float] = ..., video_frame: _Optional[bool] = ...) -> None: ...

class EncodeImageRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: ImageInput
    def __init__(self, image: _Optional[_Union[ImageInput, _Mapping]] = ...) -> None: ...

class EncodeImageResponse(_message.Message):
    __slots__ = ("soft_tokens", "num_soft_tokens", "width", "height", "timestamp_s")
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    soft_tokens: _common_pb2.Tensor
    num_soft_tokens: int
    width: int
    height: int
    timestamp_s: float
    def __init__(self, soft_tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_soft_tokens: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., timestamp_s: _Optional[float] = ...) -> None: ...

class EncodeImageBatchRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ...) -> None: ...

class EncodeImageBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EncodeImageResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[EncodeImageResponse, _Mapping]]] = ...) -> None: ...

class EncodeVideoRequest(_message.Message):
    __slots__ = ("data", "max_soft_tokens", "num_frames")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAX_SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    max_soft_tokens: int
    num_frames: int
    def __init__(self, data: _Optional[bytes] = ..., max_soft_tokens: _Optional[int] = ..., num_frames: _Optional[int] = ...) -> None: ...

class EncodeVideoResponse(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[EncodeImageResponse]
    def __init__(self, frames: _Optional[_Iterable[_Union[EncodeImageResponse, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("supported_soft_tokens", "default_max_soft_tokens", "max_soft_tokens_per_frame")
    SUPPORTED_SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SOFT_TOKENS_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    supported_soft_tokens: _containers.RepeatedScalarFieldContainer[int]
    default_max_soft_tokens: int
    max_soft_tokens_per_frame: int
    def __init__(self, supported_soft_tokens: _Optional[_Iterable[int]] = ..., default_max_soft_tokens: _Optional[int] = ..., max_soft_tokens_per_frame: _Optional[int] = ...) -> None: ...
