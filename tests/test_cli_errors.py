"""A user's mistakes on the command line, found before any work is done: one line naming what was
wrong, a non-zero exit status, no traceback and nothing written. No server runs: the commands get
the address of a closed port, so one that went as far as calling the service would fail otherwise
(UNAVAILABLE, exit status 1)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from facekit.video import VideoWriter
from talkinghead.cli import main
from tests.service_fixtures import DRIVER, PORTRAIT, REPO

CLOSED = "127.0.0.1:1"  # nothing listens on port 1


def files_in(folder: Path) -> list[str]:
    """Every file and folder under `folder` (hidden ones too), relative, sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def animate(*flags: str) -> list[str]:
    return ["animate", "--server", CLOSED, "--avatar", "astro", *flags]


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """What the command wrote to standard error: exactly one line, no traceback."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_ctrl_c_ends_any_command_with_one_line_and_status_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("client.verify_command.verify_file", interrupted)
    assert main(["verify", str(PORTRAIT)]) == 130
    assert one_line(capsys) == "talkinghead verify: interrupted"


def _parent_is_a_file(tmp_path: Path) -> tuple[list[str], str]:
    (tmp_path / "notes.txt").write_text("a file")
    out = tmp_path / "notes.txt" / "x.mp4"
    return ["--out", str(out)], f"--out {out}: {tmp_path / 'notes.txt'} is not a directory"


def _out_is_a_directory(tmp_path: Path) -> tuple[list[str], str]:
    (tmp_path / "renders.mp4").mkdir()
    return ["--out", str(tmp_path / "renders.mp4")], f"--out {tmp_path / 'renders.mp4'}: is a directory"


def _no_extension(tmp_path: Path) -> tuple[list[str], str]:
    out = tmp_path / "mona"
    return ["--out", str(out)], f"{out}: cannot write a video to a file without an extension (use .avi"


def _webm(tmp_path: Path) -> tuple[list[str], str]:
    out = tmp_path / "mona.webm"
    return ["--out", str(out)], f"{out}: cannot write a video to a '.webm' file (use .avi"


def _unwritable(tmp_path: Path) -> tuple[list[str], str]:
    return ["--out", "/proc/x.mp4"], "--out /proc/x.mp4: cannot write there ("


def _sheet_is_a_directory(tmp_path: Path) -> tuple[list[str], str]:
    flags = ["--out", str(tmp_path / "ok.mp4"), "--contact-sheet", str(tmp_path)]
    return flags, f"--contact-sheet {tmp_path}: is a directory"


def _sheet_not_png(tmp_path: Path) -> tuple[list[str], str]:
    flags = ["--out", str(tmp_path / "ok.mp4"), "--contact-sheet", str(tmp_path / "sheet.jpg")]
    return flags, f"--contact-sheet {tmp_path / 'sheet.jpg'}: the contact sheet is a PNG; name it .png"


@pytest.mark.parametrize(
    "case",
    [
        _parent_is_a_file,
        _out_is_a_directory,
        _no_extension,
        _webm,
        _unwritable,
        _sheet_is_a_directory,
        _sheet_not_png,
    ],
)
def test_animate_refuses_outputs_it_cannot_write_before_calling_the_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Callable[[Path], tuple[list[str], str]]
) -> None:
    flags, problem = case(tmp_path)
    before = files_in(tmp_path)
    assert main(animate("--driver", str(DRIVER), *flags)) == 2
    assert one_line(capsys).startswith(f"talkinghead animate: {problem}")
    assert files_in(tmp_path) == before


def test_animate_flags_take_only_what_they_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.mp4")
    for flag, value, problem in [
        ("--max-frames", "-3", "argument --max-frames: must be >= 0 (0 = all), got -3"),
        ("--max-frames", "ten", "argument --max-frames: expected a whole number, got 'ten'"),
        ("--frame-size", "256", "argument --frame-size: expected WIDTHxHEIGHT, e.g. 256x256, got '256'"),
        ("--frame-size", "256x", "argument --frame-size: expected WIDTHxHEIGHT, e.g. 256x256, got '256x'"),
        # the service's range, checked here (the service refused -1 and nan only once called, exit 1)
        ("--smooth", "-1", "argument --smooth: must be 0.01-30 Hz (or 0: off), got -1"),
        ("--smooth", "nan", "argument --smooth: must be 0.01-30 Hz (or 0: off), got nan"),
        ("--smooth", "31", "argument --smooth: must be 0.01-30 Hz (or 0: off), got 31"),
        ("--smooth", "0.001", "argument --smooth: must be 0.01-30 Hz (or 0: off), got 0.001"),
        ("--smooth", "fast", "argument --smooth: expected a number of Hz, got 'fast'"),
        ("--fps", "0", "argument --fps: must be a number > 0, got 0"),
        ("--fps", "inf", "argument --fps: must be a number > 0, got inf"),
        ("--fps", "ten", "argument --fps: expected frames per second, got 'ten'"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(animate("--driver", str(DRIVER), "--out", out, flag, value))
        assert exit.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"talkinghead animate: error: {problem}"
    with pytest.raises(SystemExit) as exit:  # the service refuses the two together
        main(animate("--driver", str(DRIVER), "--out", out, "--relative", "--crop-to-face"))
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "talkinghead animate: error: argument --crop-to-face: not allowed with argument --relative"
    )
    np.save(tmp_path / "d.npy", np.load(DRIVER)["points"][:4])
    assert main(animate("--driver", str(tmp_path / "d.npy"), "--out", out)) == 2
    assert one_line(capsys) == (
        f"talkinghead animate: {tmp_path / 'd.npy'}: a .npy file holds no frame size; "
        "pass --frame-size WIDTHxHEIGHT"
    )
    assert files_in(tmp_path) == ["d.npy"]
    assert main(animate("--driver", str(DRIVER), "--out", out, "--fps", "30")) == 2  # (the .npz has its own)
    assert (
        one_line(capsys)
        == f"talkinghead animate: --fps is for a .npy driver; {DRIVER} states its own frame rate"
    )


@pytest.mark.parametrize("flaw", ["no-eku", "self-signed"])
def test_a_certificate_c2pa_refuses_is_found_before_the_service_is_called(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flaw: str
) -> None:
    """A certificate C2PA will not sign with (no extended key usage it accepts) was found only
    once the video had been rendered and had replaced --out: "wrote x.mp4", then "signing failed",
    exit 1. A trial signature finds it first (the server here is a closed port: exit 1 if called).
    A self-signed one c2pa-python signs with, though the README (and C2PA) want one a CA issued:
    refused too (helper-71 signed with one, and verify called the file "Valid")."""
    from tests.c2pa_ca import make_ca

    bad = make_ca(tmp_path / flaw, eku=flaw != "no-eku", self_signed=flaw == "self-signed")
    out = tmp_path / "x.mp4"
    flags = [
        "--driver",
        str(DRIVER),
        "--out",
        str(out),
        "--c2pa-cert",
        str(bad.chain),
        "--c2pa-key",
        str(bad.key),
    ]
    assert main(animate(*flags)) == 2
    line = one_line(capsys)
    assert line.startswith(f"talkinghead animate: --c2pa-cert {bad.chain}: C2PA cannot sign with it: "), line
    if flaw == "self-signed":
        assert line.endswith(
            "the certificate is self-signed; C2PA wants an end-entity certificate issued by a CA"
        )
    assert not out.exists()


def test_signing_mistakes_are_found_before_the_driver_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not used")
    # The driver is missing too: a check made after reading it would report the driver.
    base = animate("--driver", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x.mp4"))
    assert main([*base, "--c2pa-cert", str(cert)]) == 2
    assert one_line(capsys) == "talkinghead animate: give both --c2pa-cert and --c2pa-key"
    assert main([*base, "--c2pa-cert", str(cert), "--c2pa-key", str(key)]) == 2
    assert one_line(capsys) == f"talkinghead animate: --c2pa-key {key}: no such file"
    key.write_text("not a key either")
    assert main([*base, "--c2pa-cert", str(cert), "--c2pa-key", str(key)]) == 2
    assert one_line(capsys) == f"talkinghead animate: --c2pa-cert {cert}: no PEM certificate in it"
    assert files_in(tmp_path) == ["cert.pem", "key.pem"]


@pytest.mark.parametrize(
    "command",
    [["avatar", "list"], ["operation", "list"], animate("--driver", str(DRIVER), "--out", "{tmp}/x.mp4")],
)
def test_connection_files_that_cannot_be_read_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    argv = [part.replace("{tmp}", str(tmp_path)) for part in command]
    name = f"talkinghead {argv[0]}"
    for flag, path, why in [
        ("--api-key-file", tmp_path / "missing.key", "no such file"),
        ("--tls-ca", tmp_path / "missing-ca.pem", "no such file"),
        ("--tls-ca", tmp_path, "is a directory"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main([*argv, "--server", CLOSED, flag, str(path)])
        assert exit.value.code == 2
        assert one_line(capsys) == f"{name}: {flag} {path}: {why}"
    assert files_in(tmp_path) == []


def test_verify_refuses_trust_anchors_without_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    video = tmp_path / "clip.mp4"
    with VideoWriter(video, fps=25, size=(64, 64)) as writer:
        writer.write(np.zeros((64, 64, 3), np.uint8))
    trust = tmp_path / "not-a-pem.txt"
    trust.write_text("these are not certificates\n")
    assert main(["verify", str(video), "--trust", str(trust)]) == 2
    assert one_line(capsys) == f"talkinghead verify: --trust {trust}: no PEM certificate in it"


def test_directories_and_other_files_are_called_what_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    out = str(tmp_path / "x.mp4")
    assert main(animate("--driver", str(folder), "--out", out)) == 2
    assert one_line(capsys) == f"talkinghead animate: {folder}: is a directory, not a video file"
    text = tmp_path / "bad.npz"
    text.write_text("points, frame_size, fps\n")
    assert main(animate("--driver", str(text), "--out", out)) == 2
    assert one_line(capsys) == f"talkinghead animate: {text}: not a NumPy .npz archive"
    assert main(["verify", str(folder)]) == 2
    assert one_line(capsys) == f"talkinghead verify: {folder}: is a directory"
    consent = ["--subject", "S", "--basis", "public-domain", "--source", "NASA", "--collected-by", "tests"]
    assert main(["avatar", "--server", CLOSED, "create", "cli-dir", str(folder), *consent]) == 2
    assert one_line(capsys) == f"talkinghead avatar: {folder}: is a directory"
    assert files_in(tmp_path) == ["bad.npz", "clips"]


def test_a_client_certificate_comes_with_its_key(tmp_path: Path) -> None:
    """--tls-cert without --tls-key (or the reverse) aborted inside gRPC (SIGABRT, exit 134)."""
    from client.library import Client
    from tests.c2pa_ca import make_ca

    pki = make_ca(tmp_path / "pki")  # real PEM files: gRPC reads them before it aborts
    for flag, path, other in (("--tls-cert", pki.chain, "--tls-key"), ("--tls-key", pki.key, "--tls-cert")):
        argv = [sys.executable, "-m", "talkinghead.cli", "avatar", "--server", CLOSED]
        argv += ["--tls-ca", str(pki.root), flag, str(path), "list"]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr) == (
            2,
            f"talkinghead avatar: {flag} needs {other}: a client certificate and its key come together\n",
        )
    with pytest.raises(ValueError, match="tls_cert needs tls_key"):
        Client(target=CLOSED, tls_cert=pki.chain)


def test_a_watch_gives_up_on_a_server_that_does_not_answer(capsys: pytest.CaptureFixture[str]) -> None:
    """It retried every second, forever, saying nothing."""
    argv = ["operation", "--server", CLOSED, "watch", "operations/0123", "--retry-for", "0.5"]
    started = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - started < 10
    lines = capsys.readouterr().err.splitlines()
    # (never reached: neither "connection lost" nor that the operation "continues on the service")
    assert lines[0].startswith("talkinghead operation watch: the service does not answer (UNAVAILABLE: ")
    assert lines[0].endswith("; retrying for up to 0.5 s") and len(lines) == 2
    assert lines[1].endswith(
        "; gave up watching: the service never answered about operations/0123; "
        "try again with `talkinghead operation watch operations/0123`"
    )
    with pytest.raises(SystemExit):
        main(["operation", "--server", CLOSED, "watch", "operations/0123", "--retry-for", "-1"])


def test_flags_that_would_do_nothing_or_the_wrong_thing_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-71: `verify --max-frames 0` checked no frame and said nothing; `avatar get --preview
    x.jpg` wrote PNG bytes into a .jpg; an empty $TALKINGHEAD_SERVER was dialled as the address
    ("Failed to create channel to ''") where the server's settings treat empty as unset."""
    for frames in ("0", "-3"):
        with pytest.raises(SystemExit) as refused:
            main(["verify", str(PORTRAIT), "--max-frames", frames])
        assert refused.value.code == 2
        assert f"--max-frames: must be >= 1, got {frames}" in capsys.readouterr().err
    preview = tmp_path / "crop.jpg"
    assert main(["avatar", "--server", CLOSED, "get", "someone", "--preview", str(preview)]) == 2
    assert one_line(capsys) == (
        f"talkinghead avatar get: --preview {preview}: the preview is a PNG; name it .png"
    )
    assert not preview.exists()
    monkeypatch.setenv("TALKINGHEAD_SERVER", "")
    from client.arguments import add_server_arguments
    from client.library import DEFAULT_SERVER

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert parser.parse_args([]).server == DEFAULT_SERVER


def test_verify_exits_2_for_a_file_whose_credentials_it_could_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a key only the content credentials are read: a file they could not be read from
    was reported as an "(image)" with exit status 0."""
    monkeypatch.delenv("TALKINGHEAD_WATERMARK_KEY", raising=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert main(["verify", str(notes), str(PORTRAIT)]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"{notes} (neither an image nor a video)\n")
    assert "  content credentials: not read (" in out
    assert f"{PORTRAIT} (image)\n" in out
    assert main(["verify", str(PORTRAIT)]) == 0  # read, no credentials in it: fine


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """Without --overwrite the check before the work is not all: a file made at the path while the
    work ran is not replaced by the commit either."""
    from client.outputs import PendingFile

    out = tmp_path / "new" / "x.mp4"
    with PendingFile(out, flag="--out", overwrite=False) as pending:
        pending.partial.write_bytes(b"the render")
        out.write_bytes(b"someone else's")
        with pytest.raises(ValueError, match="appeared while this was being written; not replaced"):
            pending.commit()
    assert out.read_bytes() == b"someone else's"
    assert files_in(tmp_path) == ["new", "new/x.mp4"]
    with PendingFile(tmp_path / "z.mp4", flag="--out", overwrite=False) as pending:
        pending.write_bytes(b"the render")
    assert (tmp_path / "z.mp4").read_bytes() == b"the render"
    assert files_in(tmp_path) == ["new", "new/x.mp4", "z.mp4"]


def test_an_output_not_written_leaves_no_folder_behind(tmp_path: Path) -> None:
    """A failed run left the output's parent folders, made for it, empty."""
    from client.outputs import PendingFile

    (tmp_path / "a").mkdir()
    with PendingFile(tmp_path / "a" / "b" / "c" / "y.mp4", flag="--out"):
        assert (tmp_path / "a" / "b" / "c").is_dir()
    assert files_in(tmp_path) == ["a"]  # the folders it made went with it, not the one it found
    with PendingFile(tmp_path / "a" / "b" / "y.mp4", flag="--out") as pending:
        pending.write_bytes(b"the render")
    assert files_in(tmp_path) == ["a", "a/b", "a/b/y.mp4"]


def test_avatar_preview_and_bench_replace_an_existing_file_only_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`avatar get --preview FILE` and `bench --out FILE` (also its `--device` file) refuse a file
    that is there unless --overwrite, as `animate` does: the same line and exit status 2, before
    the service is called or anything is timed (before: the preview and the bench's figures
    silently replaced it, the bench after minutes of work)."""
    kept = b"an earlier figure"
    preview, figures, device = tmp_path / "p.png", tmp_path / "bench.json", tmp_path / "b-cuda.json"
    cases = (
        (
            preview,
            ["avatar", "--server", CLOSED, "get", "astro", "--preview", str(preview)],
            "avatar get",
            "--preview",
        ),
        (
            figures,
            ["bench", "--model-repository", str(tmp_path / "none"), "--out", str(figures)],
            "bench",
            "--out",
        ),
        (device, ["bench", "--device", "cuda", "--out", str(tmp_path / "b.json")], "bench", "--out"),
    )
    for path, argv, command, flag in cases:
        path.write_bytes(kept)
        before = files_in(tmp_path)
        assert main(argv) == 2, argv
        assert (
            one_line(capsys)
            == f"talkinghead {command}: {flag} {path}: exists; pass --overwrite to replace it"
        )
        assert path.read_bytes() == kept and files_in(tmp_path) == before, "nothing written"
    # with --overwrite the check passes: the call goes on to the (closed) service and fails there
    assert main(["avatar", "--server", CLOSED, "get", "astro", "--preview", str(preview), "--overwrite"]) == 1
    capsys.readouterr()
    assert preview.read_bytes() == kept and files_in(tmp_path) == before, "a failed call replaces nothing"


def test_a_partial_file_left_behind_that_cannot_be_removed_does_not_stop_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial file a killed command left (client/outputs.py removes those) that this user may
    not remove (a shared folder with the sticky bit) is left; the output is written all the same."""
    from client import outputs
    from facekit import partial

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f".y.mp4.partial-{partial._host()}-{gone.pid}.mp4"
    stale.write_bytes(b"")
    unlink = os.unlink

    def refused(path: object, *args: object, **kwargs: object) -> None:
        if str(path) == str(stale):
            raise PermissionError(1, "Operation not permitted")
        unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", refused)
    with outputs.PendingFile(tmp_path / "y.mp4", flag="--out") as pending:
        pending.write_bytes(b"the render")
    monkeypatch.undo()
    assert files_in(tmp_path) == [stale.name, "y.mp4"]


def test_every_commands_help_shows_its_examples_line_by_line() -> None:
    """A command's --help is its module docstring, its examples under "examples:" (three commands
    had none, one "Examples:"): a `\\` ending an example line in a plain (not raw) docstring
    joined the example's lines into one, with runs of spaces."""
    import importlib

    from talkinghead.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        doc = importlib.import_module(module).__doc__ or ""
        assert doc.strip(), f"{name} has no --help text"
        assert "\n\nexamples:\n  " in doc, f"{name}'s examples under a heading of their own, as the others'"
        joined = [line for line in doc.splitlines() if len(line) > 110]  # (the source's line limit)
        assert not joined, (name, joined)


def test_every_option_of_every_command_says_what_it_is() -> None:
    """`--help` listed 28 options and arguments with no word on them (finetune --device, bench
    --batches, keys issue --tenant, ...)."""
    import argparse
    import importlib

    from talkinghead.cli import COMMANDS

    def silent(parser: argparse.ArgumentParser, name: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    found += silent(subparser, f"{name} {sub}")
            elif not action.help:
                found.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        return found

    unsaid = []
    for name, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"talkinghead {name}")
        importlib.import_module(module).add_arguments(parser)
        unsaid += silent(parser, name)
    assert unsaid == []


def test_talkinghead_without_a_command_is_a_wrong_call(capsys: pytest.CaptureFixture[str]) -> None:
    """`talkinghead` alone exited 0 with its usage, so a script that lost its command went on as if
    it had run; now the usage goes to stderr with status 2. `--help` is still usage on stdout, 0."""
    assert main([]) == 2
    captured = capsys.readouterr()
    assert (
        captured.out == "" and "a command is needed" in captured.err and "usage: talkinghead" in captured.err
    )
    assert main(["--help"]) == 0
    captured = capsys.readouterr()
    assert "usage: talkinghead <command>" in captured.out and captured.err == ""


@pytest.mark.parametrize(
    ("argv", "summary"),
    [
        (["keys", "issue"], "make a key for a tenant; prints it once"),
        (["avatar", "create"], "make an avatar from 1-32 photos of one person"),
        (["operation", "watch"], "follow one until done"),
    ],
)
def test_a_subcommands_help_opens_with_what_it_does(
    argv: list[str], summary: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its page was the usage and options only: the line its parent lists it with was missing."""
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    assert f"\n\n{summary}\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--config", "smoke", "--set", "loss.ssim_wieght=8"],
            "talkinghead train: --set: unknown config key 'loss.ssim_wieght'",
        ),
        (
            ["train", "--config", "smoke", "--set", "meta.steps"],
            "talkinghead train: --set meta.steps: expected key=value",
        ),
        (
            [
                "finetune",
                "--checkpoint",
                "models/talkinghead-small.pt",
                "--avatar",
                "Mona",
                "--images",
                str(PORTRAIT),
            ],
            "talkinghead finetune: invalid avatar id 'Mona'",
        ),
    ],
)
def test_training_commands_name_a_wrong_setting_in_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt `--set` key was a KeyError traceback, a bad finetune avatar id a ValueError one."""
    out = ["--run", str(tmp_path / "run")] if argv[0] == "train" else ["--out", str(tmp_path / "a.pt")]
    with pytest.raises(SystemExit) as exited:
        main([*argv, *out])
    assert str(exited.value).startswith(message), exited.value
    assert files_in(tmp_path) == []


def test_finetune_on_a_photo_without_a_face_says_which_in_one_line(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(blank)
    argv = ["finetune", "--checkpoint", str(REPO / "models/talkinghead-small.pt"), "--avatar", "x"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--images", str(blank), "--out", str(tmp_path / "x.pt")])
    assert str(exited.value) == f"talkinghead finetune: no face found in {blank}"
    assert not (tmp_path / "x.pt").exists()


def _personalised(path: Path) -> Path:
    """A file of the personalised kind (what finetune writes), made without fine-tuning."""
    from training import checkpoint

    checkpoint.save(path, {"kind": "personalised", "avatar": "mona", "config": {}})
    return path


def _training_mistakes(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, the line that names the mistake) of the training-side commands (helper-77: each was a
    traceback, a silent run or a failure after minutes of work)."""
    (tmp / "bad.yaml").write_text("model: [1,\n")
    (tmp / "notes.txt").write_text("a file")
    (tmp / "taken.pt").write_bytes(b"")
    (tmp / "taken.npz").write_bytes(b"an earlier sequence")
    (tmp / "outdir").mkdir()
    (tmp / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    mona = str(_personalised(tmp / "mona.pt"))
    model = str(REPO / "models/talkinghead-small.pt")
    train = ["train", "--config", "smoke", "--data", str(tmp), "--run", str(tmp / "run")]
    finetune = ["finetune", "--checkpoint", model, "--avatar", "x", "--images", str(PORTRAIT)]
    no_cuda = "this machine has no CUDA GPU"
    evaluate = ["evaluate", "--out", str(tmp / "eval")]
    worker = ["worker", "--jobs", str(tmp / "jobs"), "--repository", str(tmp / "repo")]
    demo = ["--driver", str(DRIVER), "--out", str(tmp / "demo")]
    return [
        (
            ["train", "--config", "nosuch", "--run", str(tmp / "run")],
            "talkinghead train: --config: no config 'nosuch'",
        ),
        (
            ["train", "--config", str(tmp / "bad.yaml"), "--run", str(tmp / "run")],
            "bad.yaml is not valid YAML",
        ),
        (
            [*train, "--set", "model.image_size=abc"],
            "--set: config.model.image_size: expected int, got 'abc'",
        ),
        (
            [*train, "--set", "finetune.synthetic_spread=-0.5"],
            "--set: config.finetune.synthetic_spread: must be 0 or more, got -0.5",
        ),
        ([*train, "--run", str(tmp / "notes.txt")], "notes.txt: a file, not a run directory"),
        ([*train, "--threads", "-1"], "argument --threads: must be >= 0, got -1"),
        ([*train, "--device", "cuda"], no_cuda),
        ([*train, "--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
        (
            [*train, "--init-from", mona],
            "mona.pt is the personalised generator of avatar 'mona': --init-from needs",
        ),
        ([*finetune, "--out", str(tmp / "outdir")], "outdir is a directory: name the checkpoint file"),
        ([*finetune, "--out", str(tmp / "taken.pt")], "taken.pt exists: give --overwrite to replace it"),
        ([*finetune, "--out", str(tmp / "notes.txt" / "x.pt")], "notes.txt is a file, not a directory"),
        ([*finetune, "--out", str(tmp / "x.pt"), "--device", "cuda"], no_cuda),
        (
            [*finetune[:5], "--video", str(DRIVER), "--frames", "100000", "--out", str(tmp / "x.pt")],
            "--frames: at most 32",
        ),
        (
            [*finetune[:5], "--images", str(tmp / "noise.png"), "--out", str(tmp / "x.pt")],
            "cannot read image",
        ),
        (
            [*finetune[:5], "--images", str(tmp / "gone.png"), "--out", str(tmp / "x.pt")],
            "gone.png: no such image file",
        ),
        (
            [
                "finetune",
                "--checkpoint",
                mona,
                "--avatar",
                "x",
                "--images",
                str(PORTRAIT),
                "--out",
                str(tmp / "x.pt"),
            ],
            "mona.pt is the personalised generator of avatar 'mona': fine-tuning needs a meta-learned",
        ),
        (
            [*evaluate, "--checkpoint", str(tmp / "noise.png")],
            "noise.png is not a readable talkinghead checkpoint",
        ),
        ([*evaluate, "--checkpoint", mona], "the evaluation needs a meta-learned checkpoint"),
        (
            [*evaluate, "--faces", str(tmp / "gone")],
            "gone (no such folder): give --faces the folder that holds",
        ),
        ([*evaluate, "--shots", "0"], "argument --shots: must be >= 1, got 0"),
        ([*worker, "--checkpoint", mona], "personalisation needs a meta-learned checkpoint"),
        ([*worker, "--checkpoint", model, "--device", "cuda"], no_cuda),
        (
            ["landmarks", str(PORTRAIT), "--out", str(tmp / "seq")],
            "--out " + str(tmp / "seq") + ": name a .npz file",
        ),
        (
            ["landmarks", str(PORTRAIT), "--out", str(tmp / "taken.npz")],
            "taken.npz: exists; pass --overwrite to replace it",
        ),
        (["preprocess", str(tmp), str(tmp / "pre"), "--size", "0"], "argument --size: must be >= 8, got 0"),
        (
            ["preprocess", str(tmp), str(tmp / "pre"), "--scale", "0"],
            "argument --scale: expected a number > 0",
        ),
        (["demo", "--portrait", str(tmp / "noise.png"), *demo], "python -m training.demo: cannot read image"),
        (
            ["demo", "--portrait", str(PORTRAIT), *demo[:-2], "--checkpoint", mona],
            "the demo needs a meta-learned",
        ),
    ]


def test_training_commands_refuse_mistakes_in_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each mistake: a non-zero exit naming it in one line, before the data, the networks or the
    fine-tuning (a directory --out failed after the whole fine-tune, an existing one was replaced;
    --device cuda on a machine without one failed at the first tensor; a personalised checkpoint
    given to evaluate, finetune or the worker was a traceback, to `train --init-from` copied where
    it fitted; `landmarks --out seq` wrote seq.npz and said "wrote seq", over an existing .npz
    without a word), and nothing written."""
    import torch

    from talkinghead.cli import run_module

    mistakes = _training_mistakes(tmp_path)
    before = files_in(tmp_path)
    for argv, message in mistakes:
        if "--device" in argv and torch.cuda.is_available():
            continue
        if argv[0] == "worker":  # (its own process: it sets up the logging of the process it runs in)
            done = subprocess.run(
                [sys.executable, "-m", "talkinghead.cli", *argv], capture_output=True, text=True, cwd=REPO
            )
            code, err = done.returncode, done.stderr
            said = err.splitlines()  # (its INFO lines may follow the refusal)
        else:
            try:
                if argv[0] == "demo":  # `make demo-direct`: python -m training.demo
                    code = run_module("training.demo", argv[1:], prog="python -m training.demo")
                else:
                    code = main(argv)
            except SystemExit as exited:
                code = exited.code if isinstance(exited.code, int) else 1
                err = str(exited.code) if not isinstance(exited.code, int) else capsys.readouterr().err
            else:
                err = capsys.readouterr().err
            said = err.strip().splitlines()[-1:]
        assert code not in (0, None) and any(message in line for line in said), (argv, code, err[-600:])
        assert "Traceback" not in err, (argv, err[-600:])
        assert files_in(tmp_path) == before, argv
    assert (tmp_path / "taken.npz").read_bytes() == b"an earlier sequence"
