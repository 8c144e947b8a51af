"""The client's streams against a real server: what the CLI writes (never over its driver or an
earlier file unasked, signed before it replaces anything, with the driver's timing), how it sends
(a live video at its frame rate) and how a stream ends (an error, a dead network path)."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import grpc
import numpy as np
import pytest
from PIL import Image

import client.animate_command as animate_command
from api.talkinghead.v1 import personalisation_pb2 as ops
from client.library import Client, Frame, landmark_requests
from facekit.sequence import LandmarkSequence
from facekit.video import VideoWriter
from talkinghead.cli import main
from tests.c2pa_ca import make_ca
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, DRIVER, PORTRAIT, REPO, ServerThread


def files_in(folder: Path) -> list[str]:
    """Every file and folder under `folder` (hidden ones too), relative, sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def portrait_video(path: Path, *, frames: int, fps: float, size: int = 256) -> Path:
    """A driving video: the portrait, still, `frames` times."""
    rgb = np.asarray(Image.open(PORTRAIT).convert("RGB").resize((size, size)))
    with VideoWriter(path, fps=fps, size=(size, size)) as writer:
        for _ in range(frames):
            writer.write(rgb)
    return path


def frame_times(video: Path) -> list[float]:
    """When each frame of a written video is shown, in seconds, in display order."""
    with av.open(str(video)) as container:
        return sorted(round(float(frame.time), 4) for frame in container.decode(video=0))


def test_animate_refuses_to_write_over_its_driver_or_an_earlier_file_unless_told(
    server: ServerThread, avatar: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--out` = `--driver` once replaced the driving video with the render (exit 0): refused now,
    whatever the spelling (a link, `..`), with --overwrite too. Any other file there is replaced
    only with --overwrite."""
    driver = portrait_video(tmp_path / "talk.mp4", frames=3, fps=10)
    before = driver.read_bytes()
    (tmp_path / "link.mp4").symlink_to(driver)
    base = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(driver)]
    for out in (driver, tmp_path / "sub" / ".." / "talk.mp4", tmp_path / "link.mp4"):
        for extra in ([], ["--overwrite"]):
            assert main([*base, "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert (
                err
                == f"talkinghead animate: --out {out}: is the driver ({driver}); write the output elsewhere\n"
            )
    assert driver.read_bytes() == before
    out, sheet = tmp_path / "out.mp4", tmp_path / "sheet.png"
    out.write_bytes(b"an earlier render")
    assert main([*base, "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err
        == f"talkinghead animate: --out {out}: exists; pass --overwrite to replace it\n"
    )
    sheet.write_bytes(b"an earlier sheet")
    assert main([*base, "--out", str(tmp_path / "new.mp4"), "--contact-sheet", str(sheet)]) == 2
    assert capsys.readouterr().err == (
        f"talkinghead animate: --contact-sheet {sheet}: exists; pass --overwrite to replace it\n"
    )
    assert out.read_bytes() == b"an earlier render" and sheet.read_bytes() == b"an earlier sheet"
    assert files_in(tmp_path) == ["link.mp4", "out.mp4", "sheet.png", "talk.mp4"]
    assert main([*base, "--out", str(out), "--contact-sheet", str(sheet), "--overwrite"]) == 0
    assert out.read_bytes().startswith(b"\x00\x00\x00") and sheet.read_bytes().startswith(b"\x89PNG")


def test_live_video_driver_is_sent_at_its_frame_rate(
    server: ServerThread, avatar: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--live with a video: 100 frames once went in 0.22 s and the service dropped 46 of them. Now
    they are sent as a camera would send them, as a landmark file's are."""
    driver = portrait_video(tmp_path / "talk.mp4", frames=10, fps=20)
    sent: list[float] = []
    make = animate_command.image_requests

    def recorded(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for request in make(*args, **kwargs):
            sent.append(time.perf_counter())
            yield request

    monkeypatch.setattr(animate_command, "image_requests", recorded)
    argv = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(driver), "--live"]
    assert main([*argv, "--out", str(tmp_path / "out.mp4")]) == 0
    assert len(sent) == 10
    assert sent[-1] - sent[0] >= 0.9 * 9 / 20  # 9 intervals of 50 ms


def test_the_video_keeps_the_drivers_timing_when_frames_are_dropped(
    server: ServerThread,
    avatar: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frames the service dropped (--live) left no gap: the rest were written back to back and the
    video ran short and fast. Now each is shown at its driver frame's time."""
    streamed = Client.animate

    def dropping(self: Client, *args: Any, **kwargs: Any) -> Iterator[Frame]:
        for frame in streamed(self, *args, **kwargs):
            if frame.sequence % 3 != 1:  # 1, 4, 7, 10 dropped, as the service reports it
                yield dataclasses.replace(frame, dropped_before=int(frame.sequence % 3 == 2))

    monkeypatch.setattr(Client, "animate", dropping)
    out = tmp_path / "out.mp4"
    argv = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(DRIVER)]
    assert main([*argv, "--max-frames", "12", "--out", str(out)]) == 0
    assert "8 frames in " in capsys.readouterr().out
    assert frame_times(out) == [i / 25 for i in (0, 2, 3, 5, 6, 8, 9, 11)]


FAILING_STREAM = """
import sys, cv2, numpy as np
# Widen the window the bug needs: the request thread inside OpenCV's parallel code when the
# interpreter exits. Each driving frame's colour conversion first blurs a large image (OpenCV's
# worker threads), so that the request thread is there whenever the stream fails.
big, convert = np.zeros((1024, 1024, 3), np.uint8), cv2.cvtColor
def slow(*args, **kwargs):
    for _ in range(4):
        cv2.GaussianBlur(big, (31, 31), 0)
    return convert(*args, **kwargs)
cv2.cvtColor = slow
from talkinghead.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_video_driven_stream_the_service_fails_exits_1_not_sigabrt(
    server: ServerThread, avatar: str, tmp_path: Path
) -> None:
    """The service ends a video-driven stream with an error (its first frame has no face): the CLI
    said so, then often died of SIGABRT (134, "terminate called without an active exception"):
    gRPC's request thread was still decoding and encoding frames while the interpreter exited.
    Four runs: two as they come (it aborted in about one of six), two with the request thread
    kept in native code (it aborted every time)."""
    driver = tmp_path / "noface.mp4"
    with VideoWriter(driver, fps=25, size=(256, 256)) as writer:
        for index in range(40):
            writer.write(np.full((256, 256, 3), 60 + index, np.uint8))
    argv = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(driver)]

    def run(index: int) -> tuple[int, str]:
        code = ["-m", "talkinghead.cli"] if index % 2 else ["-c", FAILING_STREAM]
        out = ["--out", str(tmp_path / f"out{index}.mp4")]
        done = subprocess.run(
            [sys.executable, *code, *argv, *out], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        return done.returncode, done.stderr.replace("\r", "\n").splitlines()[-1]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(4)))
    for status, last in results:
        assert status == 1, (status, last)
        assert "FAILED_PRECONDITION" in last and "no face found" in last, last
    assert files_in(tmp_path) == ["noface.mp4"]


class FreezingProxy:
    """127.0.0.1:port -> `target` that, `freeze` s after its first connection, stops forwarding
    either way while keeping every socket open: a network partition (no FIN, no RST)."""

    def __init__(self, target: str, freeze: float) -> None:
        self.target, self.freeze = target, freeze
        self.frozen, self.closed = threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            host, port = self.target.rsplit(":", 1)
            far = socket.create_connection((host, int(port)))
            self.sockets += [near, far]
            threading.Timer(self.freeze, self.frozen.set).start()
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while not self.closed.is_set():
            try:
                data = source.recv(65536)
                if not data:
                    return
                while self.frozen.is_set() and not self.closed.wait(0.1):
                    pass
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        for s in self.sockets:
            s.close()


def test_a_stream_over_a_dead_network_path_ends_unavailable(server: ServerThread, avatar: str) -> None:
    """No keepalive: a stream whose network path died silently waited forever. Now the client's
    HTTP/2 pings go unanswered and the call ends UNAVAILABLE (20 + 10 s by default; 1 + 1 s here)."""
    proxy = FreezingProxy(server.address, freeze=0.5)
    seq = LandmarkSequence.load(DRIVER)  # 8 s, sent at its frame rate
    outcome: list[object] = []

    def animate() -> None:
        with Client(target=f"127.0.0.1:{proxy.port}", keepalive_time=1.0, keepalive_timeout=1.0) as client:
            try:
                for _ in client.animate(avatar, landmark_requests(seq, pace=True)):
                    pass
                outcome.append("done")
            except grpc.RpcError as error:
                outcome.append(error.code())

    try:
        started = time.monotonic()
        worker = threading.Thread(target=animate, daemon=True)
        worker.start()
        worker.join(15)
        assert outcome == [grpc.StatusCode.UNAVAILABLE], "the stream did not end within 15 s"
        assert time.monotonic() - started < 7  # not the 8 s driver running out
    finally:
        proxy.close()


def test_a_signing_that_fails_after_rendering_writes_nothing(
    server: ServerThread,
    avatar: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Signing once ran after the outputs were renamed into place: a failure ("wrote out.mp4",
    then "signing failed", exit 1) left an unsigned file where the earlier one had been. Now the
    partial files are signed before they replace anything."""
    ca = make_ca(tmp_path / "ca")

    def refused(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the time-stamp authority did not answer")

    monkeypatch.setattr("client.provenance.sign_file", refused)
    out, sheet = tmp_path / "out" / "mona.mp4", tmp_path / "out" / "mona.png"
    out.parent.mkdir()
    out.write_bytes(b"an earlier render")
    argv = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(DRIVER)]
    argv += ["--max-frames", "4", "--out", str(out), "--contact-sheet", str(sheet), "--overwrite"]
    argv += ["--c2pa-cert", str(ca.chain), "--c2pa-key", str(ca.key)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    assert (
        f"talkinghead animate: signing {out} failed: the time-stamp authority did not answer" in captured.err
    )
    assert captured.err.splitlines()[-1].endswith(f"nothing written to {out} or {sheet}")
    assert out.read_bytes() == b"an earlier render"
    assert files_in(out.parent) == ["mona.mp4"]


def test_animate_signs_the_files_under_their_own_names(
    server: ServerThread, avatar: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Signed while still partial files: the manifests carry the final names, not the partial ones."""
    from client.credentials import read_credentials

    ca = make_ca(tmp_path / "ca")
    out = tmp_path / "mona.mp4"
    argv = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(DRIVER)]
    argv += ["--max-frames", "4", "--out", str(out), "--c2pa-cert", str(ca.chain), "--c2pa-key", str(ca.key)]
    assert main(argv) == 0
    assert f"content credentials: signed {out}\n" in capsys.readouterr().out
    report = read_credentials(out, trust_anchors=ca.root.read_bytes())
    assert report is not None and report.state == "Trusted"
    import c2pa

    with c2pa.Reader(str(out)) as reader:
        store = json.loads(reader.json())
    assert store["manifests"][store["active_manifest"]]["title"] == "mona.mp4"


def test_smooth_0_is_off_and_the_library_sends_no_filter(server: ServerThread, avatar: str) -> None:
    """The service reads smoothing 0 Hz as its default, 1.0 Hz: `--smooth 0` smoothed. Now 0 (and
    None) sends no filter at all."""
    configs = []

    class Recorded:
        def __init__(self, requests: Iterator[Any], timeout: float | None = None) -> None:
            configs.append(next(iter(requests)).config)

        def __iter__(self) -> Iterator[Any]:
            return iter(())

        def cancel(self) -> None:
            pass

    with Client(target=server.address) as client:
        client.animation = argparse.Namespace(Animate=Recorded)
        for smoothing in (None, 0.0, 2.5):
            assert list(client.animate(avatar, [], smoothing=smoothing)) == []
    assert [c.HasField("smoothing") for c in configs] == [False, False, True]
    assert configs[2].smoothing.min_cutoff_hz == pytest.approx(2.5)


def test_ctrl_c_while_waiting_on_a_personalisation_names_the_operation(
    server: ServerThread,
    client: Client,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C during `avatar personalise --wait` said only "interrupted": the operation went on,
    its name never shown. Now it is printed once queued, and again with how to follow it."""
    client.create_avatar("cli-wait", [PORTRAIT], consent=CONSENT, replace=True)

    def interrupted(*args: Any, **kwargs: Any) -> ops.Operation:
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "wait_operation", interrupted)
    try:
        assert main(["avatar", "--server", server.address, "personalise", "cli-wait", "--wait"]) == 130
        [queued] = client.list_operations(avatar_id="cli-wait")
        captured = capsys.readouterr()
        assert captured.out.startswith(f"{queued.name}  cli-wait  QUEUED")
        assert captured.err == (
            f"talkinghead avatar personalise: interrupted; {queued.name} continues on the service: "
            f"follow it with `talkinghead operation watch {queued.name}`\n"
        )
        client.cancel_operation(queued.name)
    finally:
        client.delete_avatar("cli-wait")


def test_a_lost_server_is_retried_for_a_while_then_the_watch_gives_up(
    model_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`operation watch` (and `personalise --wait`) retried a vanished server every second,
    forever, silently. Now it says so, retries for --retry-for seconds and exits 1 naming the
    operation."""
    from tests.service_fixtures import test_settings

    own = ServerThread(settings=test_settings(model_repository, tmp_path / "store"))
    stopped = False
    try:
        own.wait_ready()
        with own.client() as client:
            client.create_avatar("watched", [PORTRAIT], consent=CONSENT)
            name = client.personalise("watched").name  # no worker: it stays queued
        result: list[int] = []
        argv = ["operation", "--server", own.address, "watch", name, "--retry-for", "1.5"]
        watcher = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
        watcher.start()
        time.sleep(1.0)
        own.stop(grace=0.1)
        stopped = True
        watcher.join(20)
        assert result == [1], "the watch did not give up"
    finally:
        if not stopped:
            own.stop()
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "talkinghead operation watch: connection lost (UNAVAILABLE: " in err
    assert "; retrying for up to 1.5 s" in err
    assert err.splitlines()[-1].endswith(  # (not "continues on the service": that is not known)
        f"; gave up watching: {name} was running when the service was lost; see where it stands "
        f"with `talkinghead operation get {name}`"
    )


def test_a_client_certificate_means_tls_even_without_a_ca(server: ServerThread, tmp_path: Path) -> None:
    """--tls-cert/--tls-key without --tls-ca connected in plaintext, the certificate silently not
    used. Now a client certificate is TLS (the system's roots verify the server): against this
    plaintext server the handshake fails rather than the call going out in the clear."""
    ca = make_ca(tmp_path / "ca")
    tls = Client(target=server.address, tls_cert=ca.chain, tls_key=ca.key, timeout=10)
    with tls, pytest.raises(grpc.RpcError) as error:
        tls.health()
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with Client(target=server.address) as client:
        assert client.health() == "SERVING"


def test_an_api_key_from_the_environment_is_stripped_or_refused(
    server: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """$TALKINGHEAD_API_KEY with a trailing newline (`export KEY=$(cat file)` keeps none, an env
    file can) failed inside gRPC ("Illegal header value", INTERNAL); stripped now, as the key
    file's is. A key that cannot be a header value at all is refused before connecting."""
    monkeypatch.setenv("TALKINGHEAD_API_KEY", "thk_test-key\n")
    assert main(["avatar", "--server", server.address, "list"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("TALKINGHEAD_API_KEY", "thk_clé")
    with pytest.raises(SystemExit) as exit:
        main(["avatar", "--server", server.address, "list"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "talkinghead avatar: $TALKINGHEAD_API_KEY: the API key holds 1 character(s) that are not "
        "printable ASCII (first 'é'); an API key is printable ASCII\n"
    )
    with pytest.raises(ValueError, match="not printable ASCII"):
        Client(target=server.address, api_key="thk_\x01")


def test_operation_list_into_a_closed_pipe_ends_quietly(server: ServerThread, client: Client) -> None:
    """`talkinghead operation list | head -1` ended in a BrokenPipeError traceback."""
    client.create_avatar("cli-pipe", [PORTRAIT], consent=CONSENT, replace=True)
    try:
        name = client.personalise("cli-pipe").name
        argv = [sys.executable, "-m", "talkinghead.cli", "operation", "--server", server.address, "list"]
        for buffered in ("", "1"):  # output flushed at the end (a pipe's default), or line by line
            env = {**os.environ, "PYTHONUNBUFFERED": buffered}
            process = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            assert process.stdout is not None
            process.stdout.close()  # the reader is gone before the first line
            _, err = process.communicate(timeout=60)
            assert (err.decode(), process.returncode) == ("", 141)
        client.cancel_operation(name)
    finally:
        client.delete_avatar("cli-pipe")


def test_the_library_as_an_embedding_api(server: ServerThread, avatar: str) -> None:
    """What a game engine's Python side meets (helper-80): its source's own exception (it got
    UNKNOWN "Exception iterating requests!", the real one only in gRPC's log); a wrong encoding
    at the call, not at the first frame; each frame's own stream start when threads share a
    Client (they all read the last stream's); raw frames writable like decoded ones; wait_ready
    that keeps its timeout against a server that never answers (it waited the Client's 10 s)."""
    seq = LandmarkSequence.load(DRIVER)
    got: list[Frame] = []

    def unplugged() -> Iterator[Any]:
        yield from landmark_requests(LandmarkSequence(seq.points[:3], seq.frame_size, seq.fps))
        raise RuntimeError("camera unplugged")

    with server.client() as client:
        with pytest.raises(RuntimeError, match="camera unplugged"):
            for frame in client.animate(avatar, unplugged()):
                got.append(frame)
        assert [f.sequence for f in got] == list(range(len(got)))  # (those answered before it raised)
        with pytest.raises(ValueError, match="encoding must be one of"):
            client.animate(avatar, [], encoding="webp")  # no next(): refused at the call
        with pytest.raises(ValueError, match="one per image"):
            client.create_avatar("x", [PORTRAIT, PORTRAIT], consent=CONSENT, landmarks=[None])

        def stream(depth: int) -> list[int]:
            requests = landmark_requests(LandmarkSequence(seq.points[:4], seq.frame_size, seq.fps))
            frames = list(client.animate(avatar, requests, queue_depth=depth, encoding="raw"))
            frames[0].image[0, 0] = 0  # writable
            return [f.started.queue_depth for f in frames if f.started is not None]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            depths = list(pool.map(stream, [1, 2, 3, 4]))
        assert depths == [[1] * 4, [2] * 4, [3] * 4, [4] * 4]

    silent = socket.socket()  # accepts connections (the backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        with Client(target=f"127.0.0.1:{silent.getsockname()[1]}", timeout=10) as mute:
            began = time.monotonic()
            with pytest.raises(TimeoutError, match="within 1 s"):
                mute.wait_ready(timeout=1)
            assert time.monotonic() - began < 3
    finally:
        silent.close()
