"""Landmark detectors and `talkinghead landmarks`: faces found where a user sees them, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.data import astronaut  # NASA portrait of Eileen Collins, public domain

from facekit.detect import (
    FAN_WEIGHTS,
    S3FD_WEIGHTS,
    Bounded,
    DlibDetector,
    Face,
    MissingWeightsError,
    NoFaceError,
    largest_face,
    make_detector,
)
from facekit.layout import LEFT_EYE, MOUTH, RIGHT_EYE
from facekit.sequence import LandmarkSequence
from talkinghead.cli import main

REPO = Path(__file__).resolve().parents[1]
FACES = Path(__file__).resolve().parents[2] / "shared/data/faces"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"test clips not found at {FACES}")


@pytest.fixture(scope="module")
def dlib_detector() -> DlibDetector:
    return DlibDetector()


def test_dlib_finds_the_astronauts_face(dlib_detector: DlibDetector) -> None:
    face = largest_face(dlib_detector, astronaut(), "astronaut")
    x0, y0, x1, y1 = face.box
    assert 150 < x0 < x1 < 300 and 60 < y0 < y1 < 200  # her face, not the flag or the shuttle
    assert face.points.shape == (68, 2) and face.points.dtype == np.float32
    pad = 0.15 * (x1 - x0)  # the jaw line may poke just outside dlib's brows-to-chin box
    assert np.all((face.points >= (x0 - pad, y0 - pad)) & (face.points <= (x1 + pad, y1 + pad)))
    eyes_y = face.points[RIGHT_EYE, 1].mean(), face.points[LEFT_EYE, 1].mean()
    assert max(eyes_y) < face.points[MOUTH, 1].mean()  # upright face: eyes above the mouth
    # iBUG "right eye" is the subject's right, on the image's left
    assert face.points[RIGHT_EYE, 0].mean() < face.points[LEFT_EYE, 0].mean()


def test_blank_image_raises_no_face_naming_the_source(dlib_detector: DlibDetector) -> None:
    blank = np.zeros((200, 200, 3), np.uint8)
    assert dlib_detector.detect(blank) == []
    with pytest.raises(NoFaceError, match=r"no face found in portrait\.jpg"):
        largest_face(dlib_detector, blank, "portrait.jpg")


def test_small_image_is_retried_upsampled() -> None:
    small = cv2.resize(
        astronaut(), (256, 256), interpolation=cv2.INTER_AREA
    )  # face ~44 px: too small for HOG
    assert DlibDetector(retry_upsample=False).detect(small) == []
    faces = DlibDetector().detect(small)
    assert len(faces) == 1 and 80 < faces[0].points[:, 0].mean() < 130


def test_a_large_photo_is_searched_reduced_and_its_points_land_on_the_full_photo(
    dlib_detector: DlibDetector,
) -> None:
    """The service's detector never searches more than max_side pixels a side (a 39 Mpx photo
    held the shared detect thread 7 s); the landmarks it returns are the face's in the full photo,
    within 3 % of the eye distance of those found in the photo at its own size."""
    seen: list[tuple[int, ...]] = []

    class Spy:
        name = "spy"

        def detect(self, image: np.ndarray) -> list[Face]:
            seen.append(image.shape)
            return dlib_detector.detect(image)

    photo = astronaut()  # 512 px
    reference = largest_face(dlib_detector, photo, "astronaut").points
    eyes = float(np.linalg.norm(reference[LEFT_EYE].mean(0) - reference[RIGHT_EYE].mean(0)))
    bounded = Bounded(Spy(), max_side=1024)
    for k in (3, 7):
        large = cv2.resize(photo, (512 * k, 512 * k), interpolation=cv2.INTER_CUBIC)
        face = largest_face(bounded, large, f"astronaut x{k}")
        assert max(seen[-1][:2]) <= 1024, seen
        error = np.linalg.norm(face.points / k - reference, axis=1).mean() / eyes
        assert error < 0.03, f"x{k}: landmarks off by {error:.3f} of the eye distance"
        x0, y0, x1, y1 = face.box
        assert 150 * k < x0 < x1 < 300 * k and 60 * k < y0 < y1 < 200 * k
    assert bounded.detect(photo) and seen[-1] == photo.shape, "a photo within max_side is searched as it is"


def test_rejects_non_rgb_input(dlib_detector: DlibDetector) -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        dlib_detector.detect(np.zeros((64, 64), np.uint8))


def test_unknown_detector_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="known: dlib, face-alignment"):
        make_detector("mediapipe")


def test_face_alignment_without_weights_says_what_to_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("face_alignment")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(MissingWeightsError) as err:
        make_detector("face-alignment")
    message = str(err.value)
    assert FAN_WEIGHTS in message and S3FD_WEIGHTS in message and str(folder) in message
    assert "https://" in message
    assert not folder.exists() or not any(folder.iterdir())  # nothing was downloaded
    with pytest.raises(MissingWeightsError) as err:  # dlib boxes: only 2D-FAN is needed
        make_detector("face-alignment", face_detector="dlib")
    assert err.value.missing == [FAN_WEIGHTS]


@pytest.mark.slow
def test_face_alignment_runs_with_dlib_boxes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring (boxes in, 68 points out), with random 2D-FAN weights: the real ones are not here."""
    pytest.importorskip("face_alignment")
    import torch
    from face_alignment.models import FAN

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), tmp_path / "hub" / "checkpoints" / FAN_WEIGHTS)
    detector = make_detector("face-alignment", face_detector="dlib", flip_input=False)
    faces = detector.detect(astronaut())
    assert len(faces) == 1 and faces[0].points.shape == (68, 2) and faces[0].points.dtype == np.float32
    assert faces[0].box == DlibDetector().detect(astronaut())[0].box
    x0, y0, x1, y1 = faces[0].box
    assert np.all(np.abs(faces[0].points - ((x0 + x1) / 2, (y0 + y1) / 2)) < 2 * (x1 - x0))  # near the box


def test_importing_facekit_does_not_import_torch() -> None:
    code = (
        "import sys, facekit.detect, facekit.crop, facekit.landmarks_command; "
        "sys.exit('torch' in sys.modules or 'dlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0


def _save_rgb(path: Path, image: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


def test_landmarks_command_on_stills(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    portrait = _save_rgb(tmp_path / "portrait.png", astronaut())
    out, draw = tmp_path / "lm.npz", tmp_path / "drawn"
    assert main(["landmarks", str(portrait), "--out", str(out), "--draw", str(draw)]) == 0
    data = np.load(out)
    assert data["points"].shape == (1, 68, 2) and data["points"].dtype == np.float32
    assert list(data["frame_size"]) == [512, 512] and float(data["fps"]) == 25.0
    assert len(LandmarkSequence.load(out)) == 1  # stills load as a one-frame sequence
    drawn = cv2.imread(str(draw / "000_portrait.png"))
    assert drawn is not None and drawn.shape == (512, 1024, 3)  # frame with landmarks | landmark image
    assert drawn[:, 512:].any() and not drawn[:, 512:][:50].any()  # lines on the face, black above it

    blank = _save_rgb(tmp_path / "blank.png", np.zeros((120, 120, 3), np.uint8))
    assert main(["landmarks", str(portrait), str(blank), "--out", str(out), "--overwrite"]) == 1
    assert "no face found in blank.png" in capsys.readouterr().err
    assert np.load(out)["points"].shape == (1, 68, 2)  # the portrait's landmarks are still written


def test_landmarks_command_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["landmarks", str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg" in capsys.readouterr().err


@pytest.mark.data
@needs_faces
def test_landmarks_command_on_a_video(tmp_path: Path) -> None:
    out = tmp_path / "talk.npz"
    video = FACES / "lp_d0.mp4"  # 512 x 512, 25 fps, one frontal face
    assert main(["landmarks", str(video), "--every", "5", "--max-frames", "6", "--out", str(out)]) == 0
    data = np.load(out)
    assert list(data["frame_index"]) == [0, 5, 10, 15, 20, 25]
    assert data["points"].shape == (6, 68, 2) and float(data["fps"]) == pytest.approx(5.0)
    seq = LandmarkSequence.load(out)  # the file drives avatars as it is
    assert seq.frame_size == (512, 512) and len(seq) == 6
    motion = np.abs(np.diff(seq.points, axis=0)).max()
    assert 0 < motion < 60  # a talking head, not jumping detections


def test_landmarks_command_video_without_faces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from facekit.video import VideoWriter

    path = tmp_path / "dark.mp4"
    with VideoWriter(path, fps=25, size=(64, 64)) as writer:
        for _ in range(3):
            writer.write(np.zeros((64, 64, 3), np.uint8))
    assert main(["landmarks", str(path), "--out", str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr()
    assert "no face found in dark.mp4 (frame 2)" in err.err and "0/3" in err.out
    assert not (tmp_path / "x.npz").exists()


def test_detectors_in_many_threads_find_what_one_thread_finds() -> None:
    """The dlib models are one per process; a service's detect pool, a second server and a caller's
    own thread may all detect at once (this crashed pytest with SIGSEGV before they were locked)."""
    from concurrent.futures import ThreadPoolExecutor

    image = astronaut()
    want = DlibDetector().detect(image)[0]
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda _: DlibDetector().detect(image)[0], range(24)))
    for face in found:
        assert face.box == want.box and np.array_equal(face.points, want.points)
