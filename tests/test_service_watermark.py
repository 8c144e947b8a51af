"""Every frame the service sends carries the deployment's invisible watermark, with the payload of
its tenant and avatar: the key of TALKINGHEAD_WATERMARK_KEY, else of the server's key file;
production mode refuses to start without the variable. Real server on 127.0.0.1, frames read
back with the verifier's detector."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.library import Client, landmark_requests
from facekit.crop import crop_face
from facekit.detect import make_detector
from facekit.ids import DEFAULT_TENANT as TENANT
from facekit.pasteback import Portrait
from facekit.sequence import LandmarkSequence
from facekit.video import read_image
from facekit.watermark import KEY_ENV, MissingKeyError, Watermarker, payload_for
from service.stream import MIN_JPEG_QUALITY
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, DRIVER, PORTRAIT, ServerThread, test_settings

KEY = "test-deployment-secret-7f3a"


@pytest.fixture(scope="module")
def marked_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, KEY)
        running = ServerThread(settings=test_settings(model_repository, tmp_path_factory.mktemp("marked")))
    running.wait_ready()
    yield running
    running.stop()


def _frames(client: Client, avatar: str, driver: LandmarkSequence, **options: object) -> list[np.ndarray]:
    seq = LandmarkSequence(driver.points[:3], driver.frame_size, driver.fps)
    return [f.image for f in client.animate(avatar, landmark_requests(seq), motion="relative", **options)]


@pytest.fixture(scope="module")
def bright_portrait(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo portrait 1.6x brighter, its highlights clipped: little room to add a mark in.
    Its paste-back frames at JPEG 50 carried a mark found in 1 of 24 (the pattern stretched
    bilinearly); its crops at 50 in 22 of 24."""
    photo = np.asarray(Image.open(PORTRAIT).convert("RGB"), np.float32)
    path = tmp_path_factory.mktemp("bright") / "bright.png"
    Image.fromarray(np.clip(photo * 1.6, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("photo", ["demo", "bright"])
@pytest.mark.parametrize("paste_back", [False, True])
@pytest.mark.parametrize("quality", [0, MIN_JPEG_QUALITY])  # the default (90), the lowest served
def test_every_frame_carries_the_mark_of_its_avatar(
    marked_server: ServerThread,
    driver: LandmarkSequence,
    bright_portrait: Path,
    photo: str,
    paste_back: bool,
    quality: int,
) -> None:
    wm = Watermarker(key=KEY)
    with marked_server.client() as client:
        client.create_avatar(
            "marked", [PORTRAIT if photo == "demo" else bright_portrait], replace=True, consent=CONSENT
        )
        frames = _frames(client, "marked", driver, encoding="jpeg", quality=quality, paste_back=paste_back)
        assert client.last_started is not None
        assert client.last_started.watermark_key_id == wm.fingerprint
    assert len(frames) == 3
    for frame in frames:
        found = wm.detect(frame)
        assert found.present, found.score
        assert found.payload == payload_for(TENANT, "marked")
    assert not Watermarker(key="another deployment").detect(frames[0]).present


@pytest.mark.parametrize("quality", [0, MIN_JPEG_QUALITY])
def test_the_face_cut_out_of_a_paste_back_frame_carries_the_mark_of_its_avatar(
    marked_server: ServerThread, driver: LandmarkSequence, quality: int
) -> None:
    """The face cut out of a paste-back frame at its crop box (0.33 of the demo portrait's side)
    verifies with the stream's payload, and the whole frame still does. Before 2026-12-05 only the
    whole frame was marked and such a cut carried no mark the detector could find."""
    wm = Watermarker(key=KEY)
    with marked_server.client() as client:
        client.create_avatar("cut", [PORTRAIT], replace=True, consent=CONSENT)
        frames = _frames(client, "cut", driver, encoding="jpeg", quality=quality, paste_back=True)
    photo = read_image(PORTRAIT)
    _, _, box = crop_face(photo, make_detector("dlib").detect(photo)[0].points, 128)
    x0, y0, side = Portrait.from_photo(photo, box).origin  # the box the service pastes the face in
    assert len(frames) == 3 and frames[0].shape == photo.shape
    for frame in frames:
        cut = wm.detect(frame[y0 : y0 + side, x0 : x0 + side])
        assert cut.present and cut.payload == payload_for(TENANT, "cut"), cut.score
        whole = wm.detect(frame)
        assert whole.present and whole.payload == payload_for(TENANT, "cut"), whole.score


def test_without_a_key_every_frame_carries_the_mark_of_the_servers_key_file(
    server: ServerThread, client: Client, avatar: str, driver: LandmarkSequence
) -> None:
    """The shared server runs without TALKINGHEAD_WATERMARK_KEY: it marks with the key it made in
    its key file (before 2026-12-06 such a server sent unmarked frames, a warning in its log)."""
    key = server.settings.watermark_key_file.read_text().strip()
    wm = Watermarker(key=key)
    frames = _frames(client, avatar, driver, encoding="png")
    assert client.last_started is not None and client.last_started.watermark_key_id == wm.fingerprint
    for frame in frames:
        found = wm.detect(frame)
        assert found.present and found.payload == payload_for(TENANT, avatar), found.score
    assert not any(Watermarker(key=KEY).detect(f).present for f in frames)


def test_serve_without_a_key_makes_its_key_file_once_and_says_how_to_check_it(
    model_repository: Path, tmp_path: Path
) -> None:
    """`talkinghead serve` as a user starts it, no key in the environment: its key file is made
    (0600) and the log gives the export line; a key file it cannot use stops it in one line."""
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    command = [sys.executable, "-m", "talkinghead.cli", "serve", "--grpc-port", "0", "--metrics-port", "0"]
    command += ["--model-repository", str(model_repository), "--avatar-store", str(tmp_path / "avatars")]
    command += ["--audit-log", str(tmp_path / "audit.jsonl"), "--jobs", str(tmp_path / "jobs")]
    blocked = [*command, "--watermark-key-file", str(tmp_path)]  # a folder: no key can be read there
    done = subprocess.run(blocked, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"cannot read or make {tmp_path}: Is a directory" in done.stderr, done.stderr
    key_file = tmp_path / "state" / "watermark.key"
    with subprocess.Popen(
        [*command, "--watermark-key-file", str(key_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    ) as served:
        try:
            lines = []
            for line in served.stdout or ():
                lines.append(line)
                if "to check the mark" in line:
                    break
        finally:
            served.terminate()
    log = "".join(lines)
    assert "NOT watermarked" not in log
    assert f'export {KEY_ENV}="$(cat {key_file})"' in log, log
    key = key_file.read_text().strip()
    assert f"the watermark of key {Watermarker(key=key).fingerprint} (from {key_file})" in log
    assert key_file.stat().st_mode & 0o777 == 0o600 and key not in log


def test_production_mode_refuses_to_start_without_a_key(
    model_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    settings = replace(test_settings(model_repository, tmp_path / "avatars"), production=True)
    with pytest.raises(MissingKeyError, match=KEY_ENV):
        ServerThread(settings=settings)
    command = [sys.executable, "-m", "talkinghead.cli", "serve", "--production", "--grpc-port", "0"]
    command += ["--metrics-port", "0", "--model-repository", str(model_repository)]
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert KEY_ENV in done.stderr and "Traceback" not in done.stderr


def test_the_cli_video_is_marked_and_signed_naming_the_avatars_consent_record(
    marked_server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("c2pa")
    from client.credentials import read_credentials
    from client.verify import verify_file
    from talkinghead.cli import main
    from tests.c2pa_ca import make_ca

    ca = make_ca(tmp_path / "ca")
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("TALKINGHEAD_C2PA_CERT", str(ca.chain))
    monkeypatch.setenv("TALKINGHEAD_C2PA_KEY", str(ca.key))
    with marked_server.client() as client:
        record_id = client.create_avatar(
            "signed", [PORTRAIT], consent=CONSENT, replace=True
        ).consent.record_id
    video = tmp_path / "signed.mp4"
    argv = ["animate", "--server", marked_server.address, "--avatar", "signed", "--driver", str(DRIVER)]
    assert main([*argv, "--relative", "--max-frames", "12", "--out", str(video)]) == 0
    report = verify_file(video, key=KEY)
    assert report.watermark is not None and report.watermark.present
    assert report.watermark.payload == payload_for(TENANT, "signed")
    credentials = read_credentials(video, trust_anchors=ca.root.read_bytes())
    assert credentials is not None and credentials.state == "Trusted"
    assert credentials.generation["consent_record_id"] == record_id
