"""Session fixtures shared by the export and Triton tests: checkpoints and an exported repository."""

from __future__ import annotations

import argparse
import functools
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "models" / "talkinghead-small.pt"


@pytest.fixture(scope="session", autouse=True)
def private_var(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Servers and workers the tests start without paths of their own (`talkinghead serve` in a
    subprocess) keep their watermark key, jobs and audit log in a temporary folder, not in the
    checkout's var/ (a developer's own server state)."""
    root = tmp_path_factory.mktemp("var")
    os.environ["TALKINGHEAD_WATERMARK_KEY_FILE"] = str(root / "watermark.key")
    os.environ["TALKINGHEAD_JOBS"] = str(root / "jobs")
    os.environ["TALKINGHEAD_AUDIT_LOG"] = str(root / "audit.jsonl")
    return root


@pytest.fixture(scope="session")
def meta_ckpt() -> dict[str, Any]:
    from training import checkpoint

    return checkpoint.load(CHECKPOINT)


@pytest.fixture(scope="session")
def personal_ckpt(meta_ckpt: dict[str, Any]) -> dict[str, Any]:
    """A personalised checkpoint for avatar "alice": 2 fine-tuning steps on the demo portrait."""
    from PIL import Image

    from facekit.detect import make_detector
    from training.finetune import personalise, prepare_images

    portrait = np.asarray(Image.open(ROOT / "facekit/assets/demo_portrait.png").convert("RGB"))
    frames, points = prepare_images([portrait], ["portrait"], make_detector("dlib"), 128)
    return personalise(meta_ckpt, frames, points, avatar="alice", steps=2)


@pytest.fixture(scope="session")
def warp_guided_smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A warp-guided meta checkpoint at the smoke size, random weights (G starts as the warp): the
    shipped model's kind, cheap to export and time."""
    import torch

    from training import checkpoint
    from training.config import load_config
    from training.discriminator import Discriminator
    from training.embedder import Embedder
    from training.generator import Generator

    torch.manual_seed(0)
    cfg = load_config("smoke").replace(**{"model.warp_guided": True})
    m = cfg.model
    path = tmp_path_factory.mktemp("warp") / "warp-guided-smoke.pt"
    checkpoint.save(
        path,
        {
            "kind": "meta",
            "config": cfg.to_dict(),
            "step": 0,
            "embedder": Embedder(cfg=m).state_dict(),
            "generator": Generator(cfg=m).state_dict(),
            "discriminator": Discriminator(cfg=m, num_videos=1).state_dict(),
        },
    )
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The committed checkpoint exported (python profile) with `talkinghead export`: (repository, report)."""
    from export import command

    repo = tmp_path_factory.mktemp("export") / "model_repository"
    args = argparse.Namespace(
        checkpoint=CHECKPOINT,
        repository=repo,
        profile="python",
        device="cpu",
        no_check=False,
        triton_url=None,
        template=False,
    )
    with pytest.MonkeyPatch.context() as patch:
        quick_latency(patch)
        return repo, command.export(args)


def quick_latency(patch: pytest.MonkeyPatch) -> None:
    """The export report's ONNX Runtime latency from 3 timed calls, not up to 10 in a 2-s budget
    per batch size (4-5 s of an export on 2 cores): no test checks the figure, only that the
    export times the models and reports it."""
    from export import to_onnx

    patch.setattr(to_onnx, "latency_ms", functools.partial(to_onnx.latency_ms, repeats=3))


# The tests in flight, for a crash that takes pytest down with it (an abort in native code prints
# only thread stacks): .ci/run names them when `make test` dies. Written by the process that
# reports (pytest-xdist's controller when the suite runs on several workers, which itself names
# a test whose worker died).
INFLIGHT = ROOT / ".pytest-inflight"
_in_flight: dict[str, None] = {}


def _reporting() -> bool:
    return "PYTEST_XDIST_WORKER" not in os.environ


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    if _reporting():
        _in_flight[nodeid] = None
        INFLIGHT.write_text("".join(f"{test}\n" for test in _in_flight))


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _in_flight.pop(nodeid, None)


# The checkout's var/ is a developer's own server state (`talkinghead serve`, `make up`): a test
# that writes there (a server started without paths of its own) fails the run, naming what it left.
VAR = ROOT / "var"
_var_before: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _var_before.update(path.name for path in VAR.glob("*"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _reporting():
        INFLIGHT.unlink(missing_ok=True)
        left = sorted({path.name for path in VAR.glob("*")} - _var_before)
        if left:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(
                    f"\nFAILED: the tests wrote into the checkout's var/: {', '.join(left)}", red=True
                )
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A local Triton that never turned ready names a file of its threads' stacks
    (deploy/local/tritonserver.py); the report carries them, since CI keeps only its log."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(TimeoutError):
        found = re.search(r"\(its threads: (\S+)\)", str(call.excinfo.value))
        if found and Path(found[1]).is_file():
            report.sections.append(("tritonserver thread stacks", Path(found[1]).read_text(errors="replace")))
