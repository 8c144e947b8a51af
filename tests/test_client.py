"""The client CLI against a real server, settings from the environment, fresh stubs, import boundaries."""

from __future__ import annotations

import filecmp
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client.library import Client, Frame, landmark_requests
from facekit.sequence import LandmarkSequence
from facekit.video import VideoWriter, read_video
from service import settings as settings_module
from service.local_worker import command
from talkinghead.cli import main
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import CONSENT, DRIVER, PORTRAIT, REPO, ServerThread, test_settings

SERVER_MODULES = [
    "service.server",
    "service.serve_command",
    "service.backends.onnxruntime",
    "service.backends.triton",
]
CLIENT_MODULES = [
    "client",
    "client.library",
    "client.avatar_command",
    "client.animate_command",
    "client.bench",
]


def test_avatar_cli(server: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    flags = ["--server", server.address]
    consent = ["--subject", "Eileen Collins", "--basis", "public-domain", "--source", "NASA"]
    consent += ["--collected-by", "tests"]
    assert main(["avatar", *flags, "create", "cli-one", str(PORTRAIT), "--name", "Cli One", *consent]) == 0
    out = capsys.readouterr().out
    assert "cli-one (Cli One): 1 photo(s), 128 px, shared generator" in out and "1 face(s)" in out
    assert main(["avatar", *flags, "list"]) == 0
    assert "cli-one" in capsys.readouterr().out
    preview = tmp_path / "new" / "folder" / "p.png"  # made, as --out's
    assert main(["avatar", *flags, "get", "cli-one", "--preview", str(preview)]) == 0
    assert preview.read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert main(["avatar", *flags, "get", "cli-one", "--preview", str(preview / "p.png")]) == 2
    assert capsys.readouterr().err == (
        f"talkinghead avatar get: --preview {preview / 'p.png'}: {preview} is not a directory\n"
    )
    assert main(["avatar", *flags, "delete", "cli-one"]) == 0
    capsys.readouterr()
    assert main(["avatar", *flags, "get", "cli-one"]) == 1
    assert "NOT_FOUND: no avatar with id 'cli-one'" in capsys.readouterr().err
    assert main(["avatar", *flags, "create", "cli-two", str(tmp_path / "missing.jpg"), *consent]) == 2


def test_animate_cli_landmark_file(
    server: ServerThread, avatar: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, sheet = tmp_path / "out.mp4", tmp_path / "sheets" / "new" / "sheet.png"  # folders made
    argv = [
        "animate",
        "--server",
        server.address,
        "--avatar",
        avatar,
        "--driver",
        str(DRIVER),
        "--out",
        str(out),
        "--contact-sheet",
        str(sheet),
        "--relative",
        "--max-frames",
        "12",
    ]
    assert main(argv) == 0
    assert "12 frames in" in capsys.readouterr().out
    frames, fps = read_video(out)
    assert frames.shape[1:] == (128, 128, 3) and abs(len(frames) - 12) <= 1 and fps == pytest.approx(25)
    assert sheet.read_bytes().startswith(b"\x89PNG")
    assert files_in(tmp_path) == ["out.mp4", "sheets", "sheets/new", "sheets/new/sheet.png"]


def files_in(folder: Path) -> list[str]:
    """Every file and folder under `folder` (hidden ones too), relative, sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


class ConnectionLost(grpc.RpcError):
    """What the stream raises when the server goes away mid-stream."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Socket closed"


def test_animate_writes_nothing_when_the_service_goes_away_mid_stream(
    server: ServerThread,
    avatar: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shorter video that looks complete is worse than none: the earlier render stays as it was."""
    out, sheet = tmp_path / "out.mp4", tmp_path / "sheet.png"
    out.write_bytes(b"an earlier render")
    streamed = Client.animate

    def cut_short(self: Client, *args: Any, **kwargs: Any) -> Iterator[Frame]:
        for index, frame in enumerate(streamed(self, *args, **kwargs)):
            if index == 5:
                raise ConnectionLost()
            yield frame

    monkeypatch.setattr(Client, "animate", cut_short)
    argv = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(DRIVER)]
    argv += ["--out", str(out), "--contact-sheet", str(sheet), "--max-frames", "12", "--overwrite"]
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "talkinghead animate: UNAVAILABLE: Socket closed (5 of 12 frames received); "
        f"nothing written to {out} or {sheet}"
    )
    assert out.read_bytes() == b"an earlier render"
    assert files_in(tmp_path) == ["out.mp4"]


def cli_process(*argv: str) -> subprocess.Popen[str]:
    """`talkinghead ARGV` in a child process with Ctrl-C as from a terminal (a KeyboardInterrupt even
    where the test runs with SIGINT ignored: a background job). Not with a preexec_fn: forking a
    process whose gRPC threads are busy could abort the child before it ran anything."""
    code = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'talkinghead'; runpy.run_module('talkinghead.cli', run_name='__main__')"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("signum", "status", "what"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_or_sigterm_during_animate_writes_nothing(
    server: ServerThread, avatar: str, tmp_path: Path, signum: int, status: int, what: str
) -> None:
    """A real SIGINT (SIGTERM: what `kill`, systemd or a CI runner's timeout sends) to a real
    `talkinghead animate` streaming live (8 s of driver): no partial file, the earlier render as
    it was, no folder left behind of those made for the outputs."""
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an earlier render")
    sheet = tmp_path / "new" / "sheets" / "sheet.png"
    argv = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(DRIVER)]
    argv += ["--out", str(out), "--contact-sheet", str(sheet), "--live", "--overwrite"]
    sent = server.metric("talkinghead_frames_sent_total", 0.0)
    process = cli_process(*argv)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out.mp4.partial-*.mp4")):  # made just before the stream
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        # the stream underway: frames sent (before: 2 s waited out after the partial file)
        while server.metric("talkinghead_frames_sent_total", 0.0) < sent + 10:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == status, err
    last = err.replace("\r", "\n").splitlines()[-1]
    assert last.startswith(f"talkinghead animate: {what} (") and "Traceback" not in err
    assert last.endswith(f" of 200 frames received); nothing written to {out} or {sheet}")
    assert out.read_bytes() == b"an earlier render"
    assert files_in(tmp_path) == ["out.mp4"]


def test_the_partial_file_a_killed_animate_left_goes_with_the_next_run(
    server: ServerThread, avatar: str, tmp_path: Path
) -> None:
    """SIGKILL (`kill -9`, the OOM killer) gives `talkinghead animate` no chance to clean up: its
    hidden partial file stays beside --out. The next run writing the same --out removes it (before:
    one more such file every time), and leaves the partial file of a command still running and
    one from another host (a shared folder)."""
    out = tmp_path / "out.mp4"
    argv = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(DRIVER)]
    process = cli_process(*argv, "--out", str(out), "--live")
    sent = server.metric("talkinghead_frames_sent_total", 0.0)
    try:
        deadline = time.monotonic() + 60
        while server.metric("talkinghead_frames_sent_total", 0.0) < sent + 10:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
    finally:
        process.kill()
        process.communicate()
    [left] = tmp_path.glob(".out.mp4.partial-*")
    assert left.name.endswith(f"-{process.pid}.mp4")
    running = left.with_name(left.name.replace(f"-{process.pid}.mp4", f"-{os.getppid()}.mp4"))
    elsewhere = tmp_path / f".out.mp4.partial-otherhost-{process.pid}.mp4"
    running.write_bytes(b"")
    elsewhere.write_bytes(b"")
    np.save(tmp_path / "d.npy", np.load(DRIVER)["points"][:4])
    flags = ["--driver", str(tmp_path / "d.npy"), "--frame-size", "256x256", "--out", str(out)]
    assert main(["animate", "--server", server.address, "--avatar", avatar, *flags]) == 0
    assert files_in(tmp_path) == sorted(["d.npy", "out.mp4", running.name, elsewhere.name])
    assert len(read_video(out)[0]) == 4


def test_personalise_passes_the_steps_given_and_cancel_succeeds(
    server: ServerThread, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    client.create_avatar("cli-tune", [PORTRAIT], consent=CONSENT, replace=True)
    flags = ["--server", server.address]
    try:
        assert main(["avatar", *flags, "personalise", "cli-tune", "--steps", "0"]) == 1
        err = capsys.readouterr().err
        assert err == "talkinghead avatar personalise: INVALID_ARGUMENT: steps must be 1-2000, got 0\n"
        assert list(client.list_operations(avatar_id="cli-tune")) == []  # no default job instead
        assert main(["avatar", *flags, "personalise", "cli-tune"]) == 0  # the default: balanced
        [queued] = client.list_operations(avatar_id="cli-tune")  # no worker here: it stays queued
        assert queued.metadata.total_steps == 80
        assert main(["operation", *flags, "cancel", queued.name]) == 0
        assert "CANCELLED" in capsys.readouterr().out
        assert client.get_operation(queued.name).done
    finally:
        client.delete_avatar("cli-tune")


def test_animate_cli_npy_and_video_drivers(server: ServerThread, avatar: str, tmp_path: Path) -> None:
    points = np.load(DRIVER)["points"][:4]
    np.save(tmp_path / "d.npy", points)
    base = ["animate", "--server", server.address, "--avatar", avatar]
    assert (
        main(
            [
                *base,
                "--driver",
                str(tmp_path / "d.npy"),
                "--frame-size",
                "256x256",
                "--out",
                str(tmp_path / "a.mp4"),
            ]
        )
        == 0
    )
    from PIL import Image

    rgb = np.asarray(Image.open(PORTRAIT).convert("RGB").resize((256, 256)))
    with VideoWriter(tmp_path / "drive.mp4", fps=10, size=(256, 256)) as writer:
        for _ in range(3):
            writer.write(rgb)
    assert (
        main([*base, "--driver", str(tmp_path / "drive.mp4"), "--relative", "--out", str(tmp_path / "b.mp4")])
        == 0
    )
    frames, fps = read_video(tmp_path / "b.mp4")
    assert len(frames) == 3 and fps == pytest.approx(10)
    assert (
        main([*base, "--driver", str(tmp_path / "d.npy"), "--out", str(tmp_path / "c.mp4")]) == 2
    )  # no frame size


def test_settings_from_environment_and_flags() -> None:
    env = {
        "TALKINGHEAD_GRPC_PORT": "6000",
        "TALKINGHEAD_BACKEND": "triton",
        "TALKINGHEAD_MAX_BATCH": "8",
        "TALKINGHEAD_LOG_LEVEL": "debug",
        "TALKINGHEAD_MODEL_REPOSITORY": "/models",
    }
    s = settings_module.from_env(env, max_batch=4)
    assert (s.grpc_port, s.backend, s.max_batch, s.log_level, str(s.model_repository)) == (
        6000,
        "triton",
        4,
        "DEBUG",
        "/models",
    )
    assert settings_module.from_env({}) == settings_module.Settings()
    with pytest.raises(ValueError, match="TALKINGHEAD_GRPC_PORT"):
        settings_module.from_env({"TALKINGHEAD_GRPC_PORT": "fifty"})
    with pytest.raises(ValueError, match="backend must be one of"):
        settings_module.from_env({"TALKINGHEAD_BACKEND": "tensorflow"})
    with pytest.raises(ValueError, match="TLS needs both"):
        settings_module.from_env({"TALKINGHEAD_TLS_CERT": "/c.pem"})
    # Engine lanes: 0 is auto (two where there are two threads or more), else as asked, never
    # more than the inference threads.
    assert settings_module.from_env({"TALKINGHEAD_ENGINE_LANES": "3"}, inference_threads=4).lanes == 3
    assert settings_module.from_env({"TALKINGHEAD_ENGINE_LANES": "3"}, inference_threads=2).lanes == 2
    assert settings_module.Settings(inference_threads=1).lanes == 1
    assert settings_module.Settings(inference_threads=8).lanes == 2
    with pytest.raises(ValueError, match="engine_lanes must be 0-64"):
        settings_module.from_env({"TALKINGHEAD_ENGINE_LANES": "-1"})
    # the embedded worker: how it runs beside the server (service/local_worker.py)
    with pytest.raises(ValueError, match="worker_priority must be one of idle, low, normal"):
        settings_module.from_env({"TALKINGHEAD_WORKER_PRIORITY": "high"})
    with pytest.raises(ValueError, match="worker_threads must be 0-256"):
        settings_module.from_env({"TALKINGHEAD_WORKER_THREADS": "-2"})
    low = settings_module.from_env({"TALKINGHEAD_WORKER_PRIORITY": "low", "TALKINGHEAD_WORKER_THREADS": "2"})
    assert command(low)[command(low).index("--cpu-scheduling") :][:6] == [
        "--cpu-scheduling", "batch", "--nice", "10", "--threads", "2",
    ]  # fmt: skip
    assert "--cpu-scheduling" not in command(
        settings_module.from_env({"TALKINGHEAD_WORKER_PRIORITY": "normal"})
    )
    # its liveness: what it is doing, in a file its supervisor reads, unless the check is off
    watched = " ".join(command(settings_module.from_env({"TALKINGHEAD_WORKER_STUCK_AFTER": "60"})))
    assert "--liveness-file " in watched and "--stuck-after 60 " in watched
    unwatched = " ".join(command(settings_module.from_env({"TALKINGHEAD_WORKER_STUCK_AFTER": "0"})))
    assert "--liveness-file" not in unwatched and "--stuck-after 0 " in unwatched
    with pytest.raises(ValueError, match="worker_stuck_after must be 0-86400 seconds"):
        settings_module.from_env({"TALKINGHEAD_WORKER_STUCK_AFTER": "-1"})


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        ["make", "-s", "protos", f"GEN_ROOT={tmp_path}"], cwd=REPO, check=True, capture_output=True
    )
    fresh = sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    committed = REPO / "api"
    assert fresh, "make protos wrote nothing"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, committed / p, shallow=False)]
    assert not stale, f"api/ is stale, run `make protos`: {stale}"


def imported_packages(modules: list[str]) -> list[str]:
    """Top-level packages loaded by importing `modules` in a fresh interpreter."""
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()


def test_service_and_client_never_import_torch_training_or_export() -> None:
    for modules in (SERVER_MODULES, CLIENT_MODULES):
        bad = sorted(set(imported_packages(modules)) & {"torch", "training", "export"})
        assert bad == [], f"{modules} import {bad}"


def test_client_and_server_import_each_other_never() -> None:
    assert "service" not in imported_packages(CLIENT_MODULES)
    assert "client" not in imported_packages(SERVER_MODULES)


def test_every_package_the_commands_import_is_installed(tmp_path: Path) -> None:
    """From outside the checkout (as `talkinghead` runs from anywhere, not only from the repository
    root as pytest does), every package the commands import is found: `talkinghead bench
    --triton-venv` once failed on deploy.local, which the install did not include."""
    packages = ["talkinghead", "service", "client", "facekit", "api", "training", "export", "worker", "jobs"]
    packages.append("deploy.local.tritonserver")
    code = (
        "import importlib.util, sys; "
        f"missing = [n for n in {packages!r} if importlib.util.find_spec(n) is None]; "
        "sys.exit(f'not installed: {missing}' if missing else 0)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_waiting_on_a_personalisation_outside_a_terminal_writes_lines_not_a_bar() -> None:
    """`avatar personalise --wait` into a log or a pipe: a line per stage and per tenth of the
    steps (a bar redrawn into a file is one endless line of carriage returns)."""
    from api.talkinghead.v1 import personalisation_pb2 as ops
    from client.progress import ProgressBar

    def op(stage: str, step: int, done: bool = False) -> ops.Operation:
        progress = ops.PersonalisationProgress(avatar_id="mona", stage=stage, step=step, total_steps=20)
        progress.remaining.FromSeconds(20 - step)
        return ops.Operation(name="operations/x", metadata=progress, done=done)

    out = io.StringIO()
    show = ProgressBar(out)
    for update in [op("queued", 0), *(op("fine-tuning", s) for s in range(1, 21)), op("exporting", 20)]:
        show(update)
        show(update)  # the same state again (a watch resuming) adds nothing
    show(op("done", 20, done=True))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "mona: queued, step 0/20, ~20 s left"
    assert lines[1] == "mona: fine-tuning, step 1/20, ~19 s left"
    assert [line.split("step ")[1].split("/")[0] for line in lines[2:11]] == [str(s) for s in range(2, 20, 2)]
    assert lines[11:] == [
        "mona: fine-tuning, step 20/20",
        "mona: exporting, step 20/20",
        "mona: done, step 20/20",
    ]


def test_the_progress_of_an_operation_that_ended_names_how_it_ended() -> None:
    """The service's stage is "done" however an operation ended: a cancelled one read "done"."""
    from api.talkinghead.v1 import personalisation_pb2 as ops
    from client.progress import ProgressBar

    for state, word in [
        (ops.OPERATION_STATE_CANCELLED, "cancelled"),
        (ops.OPERATION_STATE_FAILED, "failed"),
        (ops.OPERATION_STATE_SUCCEEDED, "succeeded"),
    ]:
        progress = ops.PersonalisationProgress(
            avatar_id="mona", stage="done", step=3, total_steps=20, state=state
        )
        out = io.StringIO()
        ProgressBar(out)(ops.Operation(name="operations/x", metadata=progress, done=True))
        assert out.getvalue() == f"mona: {word}, step 3/20\n"


def test_steps_out_of_range_are_invalid_on_a_server_without_a_worker(
    model_repository: Path, tmp_path: Path
) -> None:
    """steps 0 was INVALID_ARGUMENT there but 2001 FAILED_PRECONDITION (no personalisation here):
    the range was checked after the worker. A request out of range is invalid wherever it goes."""
    running = ServerThread(settings=test_settings(model_repository, tmp_path / "store", worker="none"))
    try:
        running.wait_ready()
        with running.client() as c:
            c.create_avatar("steps", [PORTRAIT], consent=CONSENT)
            for steps in (0, 2001):
                with pytest.raises(grpc.RpcError) as error:
                    c.personalise("steps", steps=steps)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, steps
                assert error.value.details() == f"steps must be 1-2000, got {steps}"
            with pytest.raises(grpc.RpcError) as error:
                c.personalise("steps", steps=5)
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "personalisation is not available on this server" in (error.value.details() or "")
    finally:
        running.stop()


def test_the_librarys_named_choices_say_what_may_be_chosen() -> None:
    """`animate(encoding="gif")` and `personalise(preset="turbo")` raised a bare KeyError; like
    consent_record's basis, a wrong name is a ValueError listing the names, before any call."""
    from client.library import consent_record

    with Client(target="127.0.0.1:1") as client:  # (nothing listens: no call is made)
        with pytest.raises(ValueError, match="preset must be one of fast, balanced, best, got 'turbo'"):
            client.personalise("someone", preset="turbo")
        for flag, value, names in [
            ("encoding", "gif", "jpeg, png, raw"),
            ("overflow", "drop-newest", "drop-oldest, block"),
            ("motion", "sideways", "absolute, relative"),
        ]:
            with pytest.raises(ValueError, match=f"{flag} must be one of {names}, got '{value}'"):
                next(iter(client.animate("someone", [], **{flag: value})))
    with pytest.raises(ValueError, match="basis must be one of personal, public-domain, licensed"):
        consent_record(subject="s", basis="nope", collected_by="c")


def test_a_live_animate_reserves_its_drivers_frame_rate(
    server: ServerThread, avatar: str, tmp_path: Path
) -> None:
    """`animate --live` never sent StreamConfig.expected_fps: every live stream reserved the default
    25 fps of the server's capacity, whatever its driver's rate (helper-71). A .npy driver, which
    holds no rate, takes --fps (it was always 25)."""
    driver = LandmarkSequence.load(DRIVER)
    npy = tmp_path / "d.npy"
    np.save(npy, driver.points[:30])
    size = "x".join(str(v) for v in driver.frame_size)
    out = tmp_path / "live.mp4"
    argv = ["animate", "--server", server.address, "--avatar", avatar, "--driver", str(npy)]
    argv += ["--frame-size", size, "--fps", "10", "--live", "--out", str(out)]
    seen: list[float] = []
    running = threading.Thread(target=lambda: seen.append(main(argv)))
    running.start()
    reserved = set()
    while running.is_alive():  # 30 frames at 10 fps: 3 s of stream
        reserved.add(server.metric("talkinghead_committed_fps"))
        time.sleep(0.05)
    running.join()
    assert seen == [0]
    assert 10.0 in reserved and 25.0 not in reserved, reserved
    frames = read_video(out)[1]
    assert frames == pytest.approx(10.0), "written at the driver's rate"


def test_a_call_on_a_closed_client_says_the_client_is_closed(server: ServerThread, avatar: str) -> None:
    """After close() (or its with block), every call - unary, server-streaming and a stream -
    raises ValueError naming the call and that the Client is closed: gRPC's own was "Cannot
    invoke RPC on closed channel!", which did not say whose channel. Before it, the same Client
    worked, with its API key's metadata on each call."""
    with server.client() as client:
        assert client.health() == "SERVING"
        assert client.get_avatar(avatar).avatar_id == avatar
    seq = LandmarkSequence.load(DRIVER)
    calls = {
        "Check": client.health,
        "GetAvatar": lambda: client.get_avatar(avatar),
        "ListAvatars": lambda: list(client.list_avatars()),
        "Animate": lambda: next(iter(client.animate(avatar, landmark_requests(seq)))),
    }
    for method, call in calls.items():
        with pytest.raises(ValueError, match=f"^{method}: this Client is closed"):
            call()
