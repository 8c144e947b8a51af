"""The export/serving contract: model names, tensors and `talkinghead.*` metadata (../shared/DESIGN.md).

export/ writes models that keep it, service/ and the client's bench read them through it; the two
sides share nothing else. tests/test_contract.py pins it and tests/test_export.py checks the
exported files against it, so a change of the generator's inputs is made here, once.

    embedder            image, landmark_image uint8 (B, S, S, 3) -> embedding f32 (B, E), adain f32 (B, D)
    generator           landmark_image uint8 (B, S, S, 3), adain f32 (B, D) -> image uint8 (B, S, S, 3)
    generator_<avatar>  landmark_image uint8 (B, S, S, 3) -> image uint8 (B, S, S, 3)  (psi' baked in)

A warp-guided model (`talkinghead.warp_guided` = "true") has one more generator input, `warped`
uint8 (B, S, S, 3): the avatar's reference frame nearest to the driving landmarks, warped onto
them by facekit.warp.warp_nearest on the caller's side (0.5 ms per frame at 128 px), so frames of
different avatars still share one batch.

B is the dynamic batch axis (first everywhere), S the image size, D the AdaIN size, E the embedding
size (512). Each model also carries `talkinghead.*` metadata (ONNX metadata_props, repeated as
config.pbtxt parameters) from which the service rebuilds its pre-processing (`ModelInfo`). A model
repository has Triton's layout: `<repository>/<model name>/<version>/model.onnx` + config.pbtxt.
Torch-free: stdlib plus facekit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from facekit.crop import CROP_SCALE
from facekit.ids import validate_stored_id
from facekit.rasterize import DrawStyle

# -- model names (Triton model directories) ----------------------------------------------------------
EMBEDDER = "embedder"
GENERATOR = "generator"
PERSONALISED_PREFIX = "generator_"  # + avatar id: one fine-tuned generator per avatar


def personalised_name(avatar_id: str) -> str:
    """The model name of an avatar's personalised generator (the id is validated: no path tricks)."""
    return PERSONALISED_PREFIX + validate_stored_id(avatar_id)


def avatar_stamp(create_time: float) -> str:
    """Meta.AVATAR_CREATED of a generator fine-tuned on the avatar record made at `create_time`."""
    return f"{create_time:.6f}"


def made_for(stamp: str | None, record_stamp: str) -> bool:
    """Whether a personalised generator stamped `stamp` (None: made before stamps, taken as the
    avatar's) serves the record stamped `record_stamp` ("": not checked)."""
    return not stamp or not record_stamp or stamp == record_stamp


# Triton's priority levels of a generator's queue (export/repository.py dynamic_batching): a live
# frame's call (1) is scheduled before offline ones (2) waiting there (service/backends/triton.py).
TRITON_PRIORITY_LIVE, TRITON_PRIORITY_OFFLINE = 1, 2

# Personalised generators loaded at once (the service's in-process engines, or one Triton's models
# counted over every replica and the worker): beyond MAX_PERSONALISED, one loading unloads those
# not called for PERSONALISED_IDLE_S, least recently called first.
MAX_PERSONALISED = 8
PERSONALISED_IDLE_S = 60.0

# The longest a call to Triton's model control (a load, an unload, its repository index) may take
# before the caller gives up on it: the service's replicas loading a generator, the worker loading
# the one it wrote (`talkinghead worker --triton-timeout`), `talkinghead export --triton-url`.
TRITON_LOAD_TIMEOUT_S = 60.0


def ready_personalised(index: dict[str, Any]) -> set[str]:
    """Triton's repository index (`get_model_repository_index(as_json=True)`) -> the personalised
    generators it has ready."""
    return {
        str(m["name"])
        for m in index.get("models", [])
        if m.get("state") == "READY" and str(m.get("name", "")).startswith(PERSONALISED_PREFIX)
    }


def last_inference(statistics: dict[str, Any]) -> dict[str, float]:
    """Triton's inference statistics (`get_inference_statistics(as_json=True)`) -> each model's
    last inference, seconds since the epoch (0: never called)."""
    called: dict[str, float] = {}
    for stat in statistics.get("model_stats", []):
        name = str(stat.get("name", ""))
        called[name] = max(called.get(name, 0.0), int(stat.get("last_inference", 0)) / 1e3)
    return called


def instances(config: dict[str, Any]) -> tuple[int, bool]:
    """A model's instances in all, from Triton's completed config (a GPU group's count once per
    GPU it lists), and whether any runs off the CPU, where a batch costs less per frame than its
    frames one by one."""
    total, gpu = 0, False
    for group in config.get("instance_group", []):
        total += int(group.get("count", 1)) * max(1, len(group.get("gpus", [])))
        gpu = gpu or group.get("kind") != "KIND_CPU"
    return max(1, total), gpu


def idle_personalised(
    ready: set[str], called: dict[str, float], *, keep: str, idle_s: float, now: float
) -> list[tuple[str, float]]:
    """The personalised generators in `ready` that may be unloaded for another, as (name, seconds
    since its last call), least recently called first: not called for `idle_s`, never `keep`."""
    found = []
    for name in sorted(ready - {keep}, key=lambda n: called.get(n, 0.0)):
        idle = now - called.get(name, 0.0)
        if idle < idle_s:
            break  # (least recently called first: the rest were called later still)
        found.append((name, idle))
    return found


MODEL_FILE = "model.onnx"


def latest_version(model_dir: Path, filename: str = MODEL_FILE) -> Path | None:
    """`<model_dir>/<highest numeric version>/<filename>`, or None when there is none."""
    if not model_dir.is_dir():
        return None
    versions = sorted(
        (int(p.name), p) for p in model_dir.iterdir() if p.name.isdigit() and (p / filename).is_file()
    )
    return versions[-1][1] / filename if versions else None


# -- kinds (`talkinghead.kind`) ----------------------------------------------------------------------
KIND_EMBEDDER, KIND_GENERATOR, KIND_PERSONALISED = "embedder", "generator", "personalised"
KINDS = (KIND_EMBEDDER, KIND_GENERATOR, KIND_PERSONALISED)

# -- tensors -----------------------------------------------------------------------------------------
IMAGE, LANDMARK_IMAGE, EMBEDDING, ADAIN, WARPED = "image", "landmark_image", "embedding", "adain", "warped"
EMBEDDING_SIZE = 512  # E, the embedder's output size


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One input or output. `shape` is symbolic: "B" batch, "S" image size, "D" AdaIN size,
    "E" embedding size; integers are literal."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]

    def dims(self, *, image_size: int, adain_size: int, embedding_size: int = EMBEDDING_SIZE) -> list[int]:
        """The shape after the batch axis, for one model's sizes."""
        sizes = {"S": image_size, "D": adain_size, "E": embedding_size}
        return [sizes[d] if isinstance(d, str) else d for d in self.shape[1:]]


@dataclass(frozen=True, kw_only=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


_IMAGE_IN = TensorSpec(name=IMAGE, dtype="uint8", shape=("B", "S", "S", 3))
_LANDMARK_IN = TensorSpec(name=LANDMARK_IMAGE, dtype="uint8", shape=("B", "S", "S", 3))
_ADAIN = TensorSpec(name=ADAIN, dtype="float32", shape=("B", "D"))
_EMBEDDING_OUT = TensorSpec(name=EMBEDDING, dtype="float32", shape=("B", "E"))
_IMAGE_OUT = TensorSpec(name=IMAGE, dtype="uint8", shape=("B", "S", "S", 3))

_WARPED_IN = TensorSpec(name=WARPED, dtype="uint8", shape=("B", "S", "S", 3))

SIGNATURES: dict[str, Signature] = {  # by kind, the paper's G
    KIND_EMBEDDER: Signature(inputs=(_IMAGE_IN, _LANDMARK_IN), outputs=(_EMBEDDING_OUT, _ADAIN)),
    KIND_GENERATOR: Signature(inputs=(_LANDMARK_IN, _ADAIN), outputs=(_IMAGE_OUT,)),
    KIND_PERSONALISED: Signature(inputs=(_LANDMARK_IN,), outputs=(_IMAGE_OUT,)),
}
WARP_GUIDED_SIGNATURES: dict[str, Signature] = {  # by kind, the warp-guided G
    KIND_EMBEDDER: SIGNATURES[KIND_EMBEDDER],
    KIND_GENERATOR: Signature(inputs=(_LANDMARK_IN, _ADAIN, _WARPED_IN), outputs=(_IMAGE_OUT,)),
    KIND_PERSONALISED: Signature(inputs=(_LANDMARK_IN, _WARPED_IN), outputs=(_IMAGE_OUT,)),
}


def signature(kind: str, *, warp_guided: bool) -> Signature:
    return (WARP_GUIDED_SIGNATURES if warp_guided else SIGNATURES)[kind]


# -- metadata ----------------------------------------------------------------------------------------
class Meta:
    """Keys of the metadata every exported model carries; values are strings."""

    PREFIX = "talkinghead."
    KIND = PREFIX + "kind"  # one of KINDS
    IMAGE_SIZE = PREFIX + "image_size"  # S
    ADAIN_SIZE = PREFIX + "adain_size"  # D
    EMBEDDING_SIZE = PREFIX + "embedding_size"  # E
    DRAW_STYLE = PREFIX + "draw_style"  # JSON of facekit.rasterize.DrawStyle, sorted keys
    CROP_SCALE = PREFIX + "crop_scale"  # facekit.crop.crop_box's scale
    MODEL_ID = PREFIX + "model_id"  # fingerprint of the base model's weights
    STEP = PREFIX + "step"  # training step of the checkpoint
    AVATAR = PREFIX + "avatar"  # personalised models only
    WARP_GUIDED = PREFIX + "warp_guided"  # "true": the generator takes `warped`; absent = "false"
    CONSENT_RECORD = PREFIX + "consent_record"  # personalised models: the avatar's consent record id
    # personalised models: avatar_stamp of the avatar record fine-tuned on; an avatar made again
    # under the same id (deleted, replaced) is another record, whose streams do not get this model
    AVATAR_CREATED = PREFIX + "avatar_created"
    # personalised models: the id of the avatar store (deployment) whose record it was fine-tuned
    # on (jobs.avatars); a worker's sweep takes back only its own store's generators
    AVATAR_STORE = PREFIX + "avatar_store"
    # personalised models: the id of the personalisation job (operation) that made it; a later
    # attempt of that job, its worker lost before the end was written, ends with it (worker/)
    JOB = PREFIX + "job"
    GFLOPS = PREFIX + "gflops_per_frame"  # generators: multiply-adds x 2 of one frame (benchmarks)
    KEYS = (
        KIND,
        IMAGE_SIZE,
        ADAIN_SIZE,
        EMBEDDING_SIZE,
        DRAW_STYLE,
        CROP_SCALE,
        MODEL_ID,
        STEP,
        AVATAR,
        WARP_GUIDED,
        CONSENT_RECORD,
        AVATAR_CREATED,
        AVATAR_STORE,
        JOB,
        GFLOPS,
    )


def model_name(meta: Mapping[str, str]) -> str:
    """The model name a file's metadata implies: its kind, or generator_<avatar>."""
    kind = meta.get(Meta.KIND, "")
    return personalised_name(meta[Meta.AVATAR]) if kind == KIND_PERSONALISED else kind


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What the service must know about the served model; read from the models' metadata."""

    image_size: int  # S: side of every image tensor, pixels
    adain_size: int  # D: AdaIN parameters per avatar
    embedding_size: int  # E: 512
    draw_style: DrawStyle  # how landmark images are drawn (the training rasterizer's settings)
    crop_scale: float  # face crop side / landmark extent, as in training (facekit.crop.crop_box)
    model_id: str  # fingerprint of the base model's weights
    warp_guided: bool = False  # the generator takes `warped` (the avatar's nearest reference, warped)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, where: str) -> ModelInfo:
        """Parse the `talkinghead.*` string values of a model (ONNX metadata or config parameters)."""
        try:
            style = json.loads(meta[Meta.DRAW_STYLE])
            return cls(
                image_size=int(meta[Meta.IMAGE_SIZE]),
                adain_size=int(meta[Meta.ADAIN_SIZE]),
                embedding_size=int(meta.get(Meta.EMBEDDING_SIZE, str(EMBEDDING_SIZE))),
                draw_style=DrawStyle(line_width=int(style["line_width"]), antialias=bool(style["antialias"])),
                crop_scale=float(meta.get(Meta.CROP_SCALE, CROP_SCALE)),
                model_id=str(meta[Meta.MODEL_ID]),
                warp_guided=_flag(meta.get(Meta.WARP_GUIDED, "false")),
            )
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"{where}: missing or malformed talkinghead.* metadata ({error!r})") from error

    def metadata(self, *, kind: str, step: int, avatar: str | None = None) -> dict[str, str]:
        """The metadata a model of `kind` carries (the inverse of from_metadata, plus kind and step)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
        if (kind == KIND_PERSONALISED) != (avatar is not None):
            raise ValueError("a personalised model, and only one, names its avatar")
        meta = {
            Meta.KIND: kind,
            Meta.IMAGE_SIZE: str(self.image_size),
            Meta.ADAIN_SIZE: str(self.adain_size),
            Meta.EMBEDDING_SIZE: str(self.embedding_size),
            Meta.DRAW_STYLE: json.dumps(asdict(self.draw_style), sort_keys=True),
            Meta.CROP_SCALE: str(self.crop_scale),
            Meta.MODEL_ID: self.model_id,
            Meta.STEP: str(step),
            Meta.WARP_GUIDED: "true" if self.warp_guided else "false",
        }
        if avatar is not None:
            meta[Meta.AVATAR] = validate_stored_id(avatar)
        return meta

    def signature(self, kind: str) -> Signature:
        return signature(kind, warp_guided=self.warp_guided)


def _flag(value: str) -> bool:
    if value not in ("true", "false"):
        raise ValueError(f"{Meta.WARP_GUIDED} must be 'true' or 'false', got {value!r}")
    return value == "true"
