import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from api.talkinghead.v1 import landmarks_pb2 as _landmarks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConsentBasis(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSENT_BASIS_UNSPECIFIED: _ClassVar[ConsentBasis]
    CONSENT_BASIS_PERSONAL_CONSENT: _ClassVar[ConsentBasis]
    CONSENT_BASIS_PUBLIC_DOMAIN: _ClassVar[ConsentBasis]
    CONSENT_BASIS_LICENSED: _ClassVar[ConsentBasis]
CONSENT_BASIS_UNSPECIFIED: ConsentBasis
CONSENT_BASIS_PERSONAL_CONSENT: ConsentBasis
CONSENT_BASIS_PUBLIC_DOMAIN: ConsentBasis
CONSENT_BASIS_LICENSED: ConsentBasis

class SourceImage(_message.Message):
    __slots__ = ("data", "landmarks")
    DATA_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    landmarks: _landmarks_pb2.Landmarks
    def __init__(self, data: _Optional[bytes] = ..., landmarks: _Optional[_Union[_landmarks_pb2.Landmarks, _Mapping]] = ...) -> None: ...

class CreateAvatarRequest(_message.Message):
    __slots__ = ("avatar_id", "images", "display_name", "replace", "consent")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    images: _containers.RepeatedCompositeFieldContainer[SourceImage]
    display_name: str
    replace: bool
    consent: ConsentRecord
    def __init__(self, avatar_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[SourceImage, _Mapping]]] = ..., display_name: _Optional[str] = ..., replace: _Optional[bool] = ..., consent: _Optional[_Union[ConsentRecord, _Mapping]] = ...) -> None: ...

class ConsentRecord(_message.Message):
    __slots__ = ("subject", "basis", "statement_version", "document_sha256", "source", "collected_by", "collect_time", "record_id")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    COLLECTED_BY_FIELD_NUMBER: _ClassVar[int]
    COLLECT_TIME_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    subject: str
    basis: ConsentBasis
    statement_version: str
    document_sha256: str
    source: str
    collected_by: str
    collect_time: _timestamp_pb2.Timestamp
    record_id: str
    def __init__(self, subject: _Optional[str] = ..., basis: _Optional[_Union[ConsentBasis, str]] = ..., statement_version: _Optional[str] = ..., document_sha256: _Optional[str] = ..., source: _Optional[str] = ..., collected_by: _Optional[str] = ..., collect_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., record_id: _Optional[str] = ...) -> None: ...

class ImageReport(_message.Message):
    __slots__ = ("index", "faces_found", "landmarks_supplied", "width", "height", "crop_side", "warnings")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FACES_FOUND_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_SUPPLIED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CROP_SIDE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    index: int
    faces_found: int
    landmarks_supplied: bool
    width: int
    height: int
    crop_side: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[int] = ..., faces_found: _Optional[int] = ..., landmarks_supplied: _Optional[bool] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., crop_side: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class Avatar(_message.Message):
    __slots__ = ("avatar_id", "display_name", "create_time", "image_count", "images", "model_id", "personalised", "image_size", "preview_png", "crop_landmarks", "consent")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONALISED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_PNG_FIELD_NUMBER: _ClassVar[int]
    CROP_LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    display_name: str
    create_time: _timestamp_pb2.Timestamp
    image_count: int
    images: _containers.RepeatedCompositeFieldContainer[ImageReport]
    model_id: str
    personalised: bool
    image_size: int
    preview_png: bytes
    crop_landmarks: _landmarks_pb2.Landmarks
    consent: ConsentRecord
    def __init__(self, avatar_id: _Optional[str] = ..., display_name: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., image_count: _Optional[int] = ..., images: _Optional[_Iterable[_Union[ImageReport, _Mapping]]] = ..., model_id: _Optional[str] = ..., personalised: _Optional[bool] = ..., image_size: _Optional[int] = ..., preview_png: _Optional[bytes] = ..., crop_landmarks: _Optional[_Union[_landmarks_pb2.Landmarks, _Mapping]] = ..., consent: _Optional[_Union[ConsentRecord, _Mapping]] = ...) -> None: ...

class GetAvatarRequest(_message.Message):
    __slots__ = ("avatar_id", "include_preview")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    include_preview: bool
    def __init__(self, avatar_id: _Optional[str] = ..., include_preview: _Optional[bool] = ...) -> None: ...

class ListAvatarsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAvatarsResponse(_message.Message):
    __slots__ = ("avatars", "next_page_token", "total_size")
    AVATARS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    avatars: _containers.RepeatedCompositeFieldContainer[Avatar]
    next_page_token: str
    total_size: int
    def __init__(self, avatars: _Optional[_Iterable[_Union[Avatar, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class DeleteAvatarRequest(_message.Message):
    __slots__ = ("avatar_id",)
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    def __init__(self, avatar_id: _Optional[str] = ...) -> None: ...

class DeleteAvatarResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
