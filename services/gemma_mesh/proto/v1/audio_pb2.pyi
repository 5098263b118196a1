from gemma_mesh.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PcmEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PCM_ENCODING_UNSPECIFIED: _ClassVar[PcmEncoding]
    S16LE: _ClassVar[PcmEncoding]
    F32LE: _ClassVar[PcmEncoding]
PCM_ENCODING_UNSPECIFIED: PcmEncoding
S16LE: PcmEncoding
F32LE: PcmEncoding

class PcmAudio(_message.Message):
    __slots__ = ("data", "encoding", "sample_rate_hz", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    encoding: PcmEncoding
    sample_rate_hz: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., encoding: _Optional[_Union[PcmEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class EncodedAudio(_message.Message):
    __slots__ = ("data", "declared_sample_rate_hz")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DECLARED_SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    declared_sample_rate_hz: int
    def __init__(self, data: _Optional[bytes] = ..., declared_sample_rate_hz: _Optional[int] = ...) -> None: ...

class EncodeAudioRequest(_message.Message):
    __slots__ = ("pcm", "file", "split_long_audio")
    PCM_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LONG_AUDIO_FIELD_NUMBER: _ClassVar[int]
    pcm: PcmAudio
    file: EncodedAudio
    split_long_audio: bool
    def __init__(self, pcm: _Optional[_Union[PcmAudio, _Mapping]] = ..., file: _Optional[_Union[EncodedAudio, _Mapping]] = ..., split_long_audio: _Optional[bool] = ...) -> None: ...

class AudioSegment(_message.Message):
    __slots__ = ("soft_tokens", "num_soft_tokens", "range")
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    soft_tokens: _common_pb2.Tensor
    num_soft_tokens: int
    range: _common_pb2.MediaRange
    def __init__(self, soft_tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_soft_tokens: _Optional[int] = ..., range: _Optional[_Union[_common_pb2.MediaRange, _Mapping]] = ...) -> None: ...

class EncodeAudioResponse(_message.Message):
    __slots__ = ("segments", "audio_seconds")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[AudioSegment]
    audio_seconds: float
    def __init__(self, segments: _Optional[_Iterable[_Union[AudioSegment, _Mapping]]] = ..., audio_seconds: _Optional[float] = ...) -> None: ...

class AudioStreamConfig(_message.Message):
    __slots__ = ("encoding", "sample_rate_hz", "channels", "provisional_tail")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    PROVISIONAL_TAIL_FIELD_NUMBER: _ClassVar[int]
    encoding: PcmEncoding
    sample_rate_hz: int
    channels: int
    provisional_tail: bool
    def __init__(self, encoding: _Optional[_Union[PcmEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., channels: _Optional[int] = ..., provisional_tail: _Optional[bool] = ...) -> None: ...

class AudioStreamEnd(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: int
    def __init__(self, samples: _Optional[int] = ...) -> None: ...

class AudioStreamRequest(_message.Message):
    __slots__ = ("config", "pcm", "end")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    config: AudioStreamConfig
    pcm: bytes
    end: AudioStreamEnd
    def __init__(self, config: _Optional[_Union[AudioStreamConfig, _Mapping]] = ..., pcm: _Optional[bytes] = ..., end: _Optional[_Union[AudioStreamEnd, _Mapping]] = ...) -> None: ...

class AudioStreamResponse(_message.Message):
    __slots__ = ("soft_tokens", "num_soft_tokens", "range", "first_token", "provisional")
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROVISIONAL_FIELD_NUMBER: _ClassVar[int]
    soft_tokens: _common_pb2.Tensor
    num_soft_tokens: int
    range: _common_pb2.MediaRange
    first_token: int
    provisional: bool
    def __init__(self, soft_tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_soft_tokens: _Optional[int] = ..., range: _Optional[_Union[_common_pb2.MediaRange, _Mapping]] = ..., first_token: _Optional[int] = ..., provisional: _Optional[bool] = ...) -> None: ...
