from api.talkinghead.v1 import landmarks_pb2 as _landmarks_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_ENCODING_UNSPECIFIED: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_JPEG: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_PNG: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_RAW_RGB: _ClassVar[OutputEncoding]

class OverflowPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OVERFLOW_POLICY_UNSPECIFIED: _ClassVar[OverflowPolicy]
    OVERFLOW_POLICY_DROP_OLDEST: _ClassVar[OverflowPolicy]
    OVERFLOW_POLICY_BLOCK: _ClassVar[OverflowPolicy]

class MotionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MOTION_MODE_UNSPECIFIED: _ClassVar[MotionMode]
    MOTION_MODE_ABSOLUTE: _ClassVar[MotionMode]
    MOTION_MODE_RELATIVE: _ClassVar[MotionMode]
OUTPUT_ENCODING_UNSPECIFIED: OutputEncoding
OUTPUT_ENCODING_JPEG: OutputEncoding
OUTPUT_ENCODING_PNG: OutputEncoding
OUTPUT_ENCODING_RAW_RGB: OutputEncoding
OVERFLOW_POLICY_UNSPECIFIED: OverflowPolicy
OVERFLOW_POLICY_DROP_OLDEST: OverflowPolicy
OVERFLOW_POLICY_BLOCK: OverflowPolicy
MOTION_MODE_UNSPECIFIED: MotionMode
MOTION_MODE_ABSOLUTE: MotionMode
MOTION_MODE_RELATIVE: MotionMode

class StreamConfig(_message.Message):
    __slots__ = ("avatar_id", "encoding", "quality", "overflow", "motion", "queue_depth", "crop_to_face", "neutral", "neutral_frame_width", "neutral_frame_height", "include_landmark_image", "paste_back", "smoothing", "expected_fps")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    MOTION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    CROP_TO_FACE_FIELD_NUMBER: _ClassVar[int]
    NEUTRAL_FIELD_NUMBER: _ClassVar[int]
    NEUTRAL_FRAME_WIDTH_FIELD_NUMBER: _ClassVar[int]
    NEUTRAL_FRAME_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LANDMARK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    PASTE_BACK_FIELD_NUMBER: _ClassVar[int]
    SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FPS_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    encoding: OutputEncoding
    quality: int
    overflow: OverflowPolicy
    motion: MotionMode
    queue_depth: int
    crop_to_face: bool
    neutral: _landmarks_pb2.Landmarks
    neutral_frame_width: int
    neutral_frame_height: int
    include_landmark_image: bool
    paste_back: bool
    smoothing: LandmarkSmoothing
    expected_fps: float
    def __init__(self, avatar_id: _Optional[str] = ..., encoding: _Optional[_Union[OutputEncoding, str]] = ..., quality: _Optional[int] = ..., overflow: _Optional[_Union[OverflowPolicy, str]] = ..., motion: _Optional[_Union[MotionMode, str]] = ..., queue_depth: _Optional[int] = ..., crop_to_face: _Optional[bool] = ..., neutral: _Optional[_Union[_landmarks_pb2.Landmarks, _Mapping]] = ..., neutral_frame_width: _Optional[int] = ..., neutral_frame_height: _Optional[int] = ..., include_landmark_image: _Optional[bool] = ..., paste_back: _Optional[bool] = ..., smoothing: _Optional[_Union[LandmarkSmoothing, _Mapping]] = ..., expected_fps: _Optional[float] = ...) -> None: ...

class LandmarkSmoothing(_message.Message):
    __slots__ = ("min_cutoff_hz", "beta")
    MIN_CUTOFF_HZ_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    min_cutoff_hz: float
    beta: float
    def __init__(self, min_cutoff_hz: _Optional[float] = ..., beta: _Optional[float] = ...) -> None: ...

class LandmarkFrame(_message.Message):
    __slots__ = ("sequence", "capture_time_us", "landmarks", "frame_width", "frame_height")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    FRAME_WIDTH_FIELD_NUMBER: _ClassVar[int]
    FRAME_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    capture_time_us: int
    landmarks: _landmarks_pb2.Landmarks
    frame_width: int
    frame_height: int
    def __init__(self, sequence: _Optional[int] = ..., capture_time_us: _Optional[int] = ..., landmarks: _Optional[_Union[_landmarks_pb2.Landmarks, _Mapping]] = ..., frame_width: _Optional[int] = ..., frame_height: _Optional[int] = ...) -> None: ...

class DrivingFrame(_message.Message):
    __slots__ = ("sequence", "capture_time_us", "image")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    capture_time_us: int
    image: bytes
    def __init__(self, sequence: _Optional[int] = ..., capture_time_us: _Optional[int] = ..., image: _Optional[bytes] = ...) -> None: ...

class Keepalive(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AnimateRequest(_message.Message):
    __slots__ = ("config", "landmarks", "driving_frame", "keepalive")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    DRIVING_FRAME_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    landmarks: LandmarkFrame
    driving_frame: DrivingFrame
    keepalive: Keepalive
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., landmarks: _Optional[_Union[LandmarkFrame, _Mapping]] = ..., driving_frame: _Optional[_Union[DrivingFrame, _Mapping]] = ..., keepalive: _Optional[_Union[Keepalive, _Mapping]] = ...) -> None: ...

class StreamStarted(_message.Message):
    __slots__ = ("image_size", "personalised", "model_id", "queue_depth", "output_width", "output_height", "watermark_key_id", "latency_budget_ms")
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PERSONALISED_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    image_size: int
    personalised: bool
    model_id: str
    queue_depth: int
    output_width: int
    output_height: int
    watermark_key_id: str
    latency_budget_ms: int
    def __init__(self, image_size: _Optional[int] = ..., personalised: _Optional[bool] = ..., model_id: _Optional[str] = ..., queue_depth: _Optional[int] = ..., output_width: _Optional[int] = ..., output_height: _Optional[int] = ..., watermark_key_id: _Optional[str] = ..., latency_budget_ms: _Optional[int] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_us", "landmarks_us", "rasterize_us", "queue_us", "inference_us", "encode_us", "total_us")
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_US_FIELD_NUMBER: _ClassVar[int]
    RASTERIZE_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    ENCODE_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    decode_us: int
    landmarks_us: int
    rasterize_us: int
    queue_us: int
    inference_us: int
    encode_us: int
    total_us: int
    def __init__(self, decode_us: _Optional[int] = ..., landmarks_us: _Optional[int] = ..., rasterize_us: _Optional[int] = ..., queue_us: _Optional[int] = ..., inference_us: _Optional[int] = ..., encode_us: _Optional[int] = ..., total_us: _Optional[int] = ...) -> None: ...

class AnimatedFrame(_message.Message):
    __slots__ = ("sequence", "capture_time_us", "image", "encoding", "width", "height", "timings", "dropped_before", "dropped_total", "batch_size", "face_missing", "landmark_image")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FACE_MISSING_FIELD_NUMBER: _ClassVar[int]
    LANDMARK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    capture_time_us: int
    image: bytes
    encoding: OutputEncoding
    width: int
    height: int
    timings: StageTimings
    dropped_before: int
    dropped_total: int
    batch_size: int
    face_missing: bool
    landmark_image: bytes
    def __init__(self, sequence: _Optional[int] = ..., capture_time_us: _Optional[int] = ..., image: _Optional[bytes] = ..., encoding: _Optional[_Union[OutputEncoding, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., dropped_before: _Optional[int] = ..., dropped_total: _Optional[int] = ..., batch_size: _Optional[int] = ..., face_missing: _Optional[bool] = ..., landmark_image: _Optional[bytes] = ...) -> None: ...

class AnimateResponse(_message.Message):
    __slots__ = ("started", "frame")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    started: StreamStarted
    frame: AnimatedFrame
    def __init__(self, started: _Optional[_Union[StreamStarted, _Mapping]] = ..., frame: _Optional[_Union[AnimatedFrame, _Mapping]] = ...) -> None: ...
