"""Face detection + 68-point landmarks behind one interface: `make_detector(name).detect(rgb)`.

Two backends, both returning points in the iBUG 300-W 68-point order (facekit.layout):

- "dlib" (default): dlib's HOG frontal face detector (or its MMOD CNN detector) and the 68-point
  shape predictor, both shipped by the `face-recognition-models` package; CPU only, ~4 ms to detect
  at 256 px and ~1 ms for the landmarks. The 68-point model is trained on iBUG 300-W, whose
  images are licensed for NON-COMMERCIAL use only: a commercial product needs other landmarks.
- "face-alignment": the paper's detector (Bulat & Tzimiropoulos' 2D-FAN, `face_alignment`
  package; imports torch, only when this detector is made). It never downloads: its weights must
  already be in `$TORCH_HOME/hub/checkpoints/` (default ~/.cache/torch/hub/checkpoints/):
    - face_detector="sfd" (default): 2DFAN4-11f355bf06.pth.tar and s3fd-619a316812.pth
    - face_detector="dlib": only 2DFAN4-11f355bf06.pth.tar (dlib's HOG boxes feed 2D-FAN)
  Get them from https://www.adrianbulat.com/downloads/python-fan/ (the URLs face_alignment
  itself would fetch), on a machine with network access. 2D-FAN is also trained on 300-W data.

Importing this module imports neither torch nor dlib.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facekit.layout import NUM_POINTS

# Images whose longer side is at most this are searched again with dlib upsampling when the first
# pass finds nothing: HOG misses faces under ~80 px, upsampling by 2 halves that.
SMALL_IMAGE = 1024

FAN_WEIGHTS = "2DFAN4-11f355bf06.pth.tar"
S3FD_WEIGHTS = "s3fd-619a316812.pth"
WEIGHTS_URL = "https://www.adrianbulat.com/downloads/python-fan/"


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    points: np.ndarray  # (68, 2) float32, (x, y) pixels, iBUG 300-W order
    score: float  # detector confidence; larger is surer, scale depends on the detector

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class NoFaceError(ValueError):
    """No face in an image; `source` names the image (file name, or file and frame index)."""

    def __init__(self, source: str) -> None:
        super().__init__(f"no face found in {source}")
        self.source = source


class MissingWeightsError(RuntimeError):
    """A detector's weight files are not on disk (and will not be downloaded)."""

    def __init__(self, missing: list[str], folder: Path) -> None:
        names = ", ".join(missing)
        super().__init__(
            f"face-alignment weights missing: {names} not found in {folder}. Download "
            + " and ".join(WEIGHTS_URL + name for name in missing)
            + f" on a machine with network access and put them in {folder} (set TORCH_HOME to use"
            " another folder), or use `--detector dlib`, which needs no download."
        )
        self.missing = missing
        self.folder = folder


class LandmarkDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """RGB uint8 (H, W, 3) -> every face found, largest first."""
        ...


def check_image(image: np.ndarray) -> np.ndarray:
    """Return `image` as a C-contiguous uint8 (H, W, 3) array, or raise ValueError."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {img.dtype} {tuple(img.shape)}")
    return np.ascontiguousarray(img)


class Bounded:
    """A detector that searches images larger than `max_side` (longer side) at a reduced size:
    the cost of a detection is that of a `max_side` image, whatever the photo's size. dlib's HOG
    at full size took 7 s for a 39 Mpx photo (inside the service's 40 Mpx limit), holding the one
    detect thread every caller shares. Points and boxes come back in the full image's pixels;
    a face must be about 80 px (40 px after dlib's upsampled retry) at the reduced size."""

    def __init__(self, detector: LandmarkDetector, *, max_side: int) -> None:
        if max_side < 64:
            raise ValueError(f"max_side must be >= 64, got {max_side}")
        self.inner, self.max_side = detector, max_side
        self.name = detector.name

    def detect(self, image: np.ndarray) -> list[Face]:
        img = check_image(image)
        factor = -(-max(img.shape[:2]) // self.max_side)  # ceil: the reduced side is <= max_side
        if factor <= 1:
            return self.inner.detect(img)
        from PIL import Image

        small = np.asarray(Image.fromarray(img).reduce(factor))  # box filter: each pixel a factor^2 mean
        faces = []
        for face in self.inner.detect(small):
            x0, y0, x1, y1 = face.box
            # a reduced pixel i covers full pixels [i * factor, (i + 1) * factor): centres map as below
            points = ((face.points + 0.5) * factor - 0.5).astype(np.float32)
            faces.append(
                Face(
                    box=(x0 * factor, y0 * factor, x1 * factor, y1 * factor), points=points, score=face.score
                )
            )
        return faces


def largest_face(detector: LandmarkDetector, image: np.ndarray, source: str) -> Face:
    """The largest face in `image`, or NoFaceError naming `source`."""
    faces = detector.detect(image)
    if not faces:
        raise NoFaceError(source)
    return faces[0]


def face_recognition_models_dir() -> Path:
    """The `models/` folder of the face_recognition_models package (found without pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the dlib detector needs `face-recognition-models`: pip install face-recognition-models"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


# dlib's detectors are not safe for concurrent use ("concurrent access to an instance ... should
# be protected by a mutex lock", scan_fhog_pyramid's documentation), and the models below are one
# per process, shared by every DlibDetector: a service's detect pool, another server in the same
# process, a caller's own thread. Two threads in `run` at once crashed pytest (SIGSEGV in a
# service's detect thread, test_service_identity). Every use of them holds this lock.
_DLIB_LOCK = threading.Lock()


@functools.cache
def _dlib_models(face_detector: str) -> tuple[Any, Any]:
    """(face detector, 68-point predictor), loaded once per process (~1 s); used under _DLIB_LOCK."""
    import dlib

    models = face_recognition_models_dir()
    if face_detector == "cnn":
        detector = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
    else:
        detector = dlib.get_frontal_face_detector()
    return detector, dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))


class DlibDetector:
    """dlib face detector + 68-point shape predictor; models load on first use (once per process)."""

    name = "dlib"

    def __init__(self, *, upsample: int = 0, retry_upsample: bool = True, face_detector: str = "hog") -> None:
        if upsample not in (0, 1, 2):
            raise ValueError(f"upsample must be 0, 1 or 2, got {upsample}")
        if face_detector not in ("hog", "cnn"):
            raise ValueError(f"dlib face_detector must be 'hog' or 'cnn', got {face_detector!r}")
        self.upsample = upsample
        self.retry_upsample = retry_upsample
        self.face_detector = face_detector
        self._detector: Any = None
        self._predictor: Any = None

    def _load(self) -> None:
        self._detector, self._predictor = _dlib_models(self.face_detector)

    def boxes(self, image: np.ndarray) -> list[tuple[Any, float]]:
        """dlib rectangles with scores, unsorted; retries upsampled on small images."""
        if self._detector is None:
            self._load()
        img = check_image(image)
        found = self._run(img, self.upsample)
        if not found and self.retry_upsample and self.upsample == 0 and max(img.shape[:2]) <= SMALL_IMAGE:
            found = self._run(img, 1)
        return found

    def _run(self, img: np.ndarray, upsample: int) -> list[tuple[Any, float]]:
        with _DLIB_LOCK:
            if self.face_detector == "cnn":
                return [(d.rect, float(d.confidence)) for d in self._detector(img, upsample)]
            rects, scores, _ = self._detector.run(img, upsample, 0.0)
        return list(zip(rects, map(float, scores), strict=True))

    def detect(self, image: np.ndarray) -> list[Face]:
        img = check_image(image)
        faces = []
        for rect, score in self.boxes(img):
            with _DLIB_LOCK:
                shape = self._predictor(img, rect)
            points = np.array([(p.x, p.y) for p in shape.parts()], np.float32)  # (68, 2)
            box = (float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1))
            faces.append(Face(box=box, points=points, score=score))
        return sorted(faces, key=lambda f: f.area, reverse=True)


def torch_checkpoint_dir() -> Path:
    """Where torch.hub (and so face_alignment) keeps downloaded weights."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


class FaceAlignmentDetector:
    """face_alignment's 2D-FAN landmarks, boxes from S3FD ("sfd") or dlib HOG ("dlib").

    flip_input (face_alignment's default) averages with a mirrored pass: steadier, twice the cost
    (2D-FAN is ~0.4 s a face on a CPU core without it). The first call in a process also spends
    ~10 s compiling face_alignment's numba post-processing.
    """

    name = "face-alignment"

    def __init__(self, *, face_detector: str = "sfd", device: str = "cpu", flip_input: bool = True) -> None:
        if face_detector not in ("sfd", "dlib"):
            raise ValueError(f"face-alignment face_detector must be 'sfd' or 'dlib', got {face_detector!r}")
        folder = torch_checkpoint_dir()
        needed = [FAN_WEIGHTS] + ([S3FD_WEIGHTS] if face_detector == "sfd" else [])
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise MissingWeightsError(missing, folder)
        import face_alignment

        kwargs: dict[str, Any] = {"device": device, "flip_input": flip_input}
        if "compile" in inspect.signature(face_alignment.FaceAlignment).parameters:
            kwargs["compile"] = False
        if face_detector == "sfd":
            kwargs["face_detector"] = "sfd"
            kwargs["face_detector_kwargs"] = {"path_to_detector": str(folder / S3FD_WEIGHTS)}
        else:
            kwargs["face_detector"] = "folder"  # builds no detector: boxes come from dlib below
        self._dlib = DlibDetector() if face_detector == "dlib" else None
        self._fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, **kwargs)

    def detect(self, image: np.ndarray) -> list[Face]:
        img = check_image(image)
        if self._dlib is not None:
            found = [[r.left(), r.top(), r.right() + 1, r.bottom() + 1, s] for r, s in self._dlib.boxes(img)]
        else:
            found = self._fa.face_detector.detect_from_image(img.copy())
        if len(found) == 0:
            return []
        # float64: face_alignment writes box-derived numpy scalars into torch tensors, float32 ones fail
        boxes = [np.asarray(b, np.float64) for b in found]  # each (5,): x0, y0, x1, y1, score
        points, _, boxes = self._fa.get_landmarks_from_image(img, detected_faces=boxes, return_bboxes=True)
        faces = []
        for pts, box in zip(points or [], boxes or [], strict=True):
            b = [float(v) for v in box]
            score = b[4] if len(b) > 4 else 1.0
            xy = np.asarray(pts, np.float32)[:NUM_POINTS, :2]  # (68, 2)
            faces.append(Face(box=(b[0], b[1], b[2], b[3]), points=xy, score=score))
        return sorted(faces, key=lambda f: f.area, reverse=True)


DETECTORS: dict[str, type] = {"dlib": DlibDetector, "face-alignment": FaceAlignmentDetector}


def make_detector(name: str = "dlib", **options: Any) -> LandmarkDetector:
    """Build the named detector; `options` go to its constructor (keyword-only)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown landmark detector {name!r}; known: {', '.join(DETECTORS)}")
    detector: LandmarkDetector = DETECTORS[name](**options)
    return detector
