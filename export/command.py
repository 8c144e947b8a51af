"""`talkinghead export`: a checkpoint -> ONNX files -> a Triton model repository, with a report.

A meta checkpoint gives `embedder` and `generator` (and beside the generator the template its
avatars' generators are written from: `--no-template`); a personalised one (from `talkinghead
finetune`) adds `generator_<avatar>` to a live repository as a new model version. Every model is
checked against PyTorch on real frames (the demo portrait, driven by the demo landmarks) and
timed with ONNX Runtime on CPU; the figures go to the report (JSON) and the log, and a model that
differs from PyTorch by more than 2 levels of an image or 1e-3 of psi is not written (exit 1).
Every model is exported and checked before any is written, so a failure or a kill leaves the
repository as it was (not an embedder of one checkpoint beside the generator of another). A
checkpoint that cannot be read, or a repository or report that cannot be written, is one line and
exit 2 before any work.

examples:
    talkinghead export --checkpoint models/talkinghead-small.pt --repository model_repository
    talkinghead export --checkpoint out/demo/avatar.pt --repository model_repository \\
        --triton-url 127.0.0.1:8001          # add an avatar's generator and load it in Triton
    talkinghead export --remove-avatar demo --repository model_repository --triton-url 127.0.0.1:8001
    talkinghead export --checkpoint models/talkinghead-small.pt --repository repo-trt --profile tensorrt
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from export import repository, to_onnx
from facekit import contract, engines
from facekit.detect import make_detector
from facekit.motion import transfer_motion
from facekit.rasterize import draw_batch
from facekit.sequence import LandmarkSequence
from facekit.warp import warp_nearest
from training import checkpoint
from training.finetune import prepare_images

log = logging.getLogger("talkinghead.export")
ASSETS = Path(__file__).resolve().parent.parent / "facekit" / "assets"
PARITY_FRAMES = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="meta or personalised checkpoint (.pt)")
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="Triton model repository (default %(default)s)",
    )
    parser.add_argument(
        "--profile",
        choices=repository.PROFILES,
        default="python",
        help="Triton platform: python (runs here), onnxruntime or tensorrt (default: python)",
    )
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="instance kind (onnxruntime)")
    parser.add_argument(
        "--report",
        type=Path,
        help="JSON report (default: <repository>.export.json; an avatar's generator: "
        "<repository>.generator_<avatar>.export.json)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the parity check and timing")
    parser.add_argument(
        "--no-template",
        dest="template",
        action="store_false",
        help="meta checkpoint: do not write the personalised generator a worker's first job starts from "
        f"(generator/<version>/{repository.TEMPLATE_FILE}, 10-20 s of tracing)",
    )
    parser.add_argument("--triton-url", help="load (or unload) the changed models in this Triton (gRPC)")
    parser.add_argument("--remove-avatar", metavar="ID", help="unload and delete generator_<ID>")


def real_inputs(ckpt: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Inputs for every model built from the demo portrait and the demo driver's first frames."""
    cfg = checkpoint.config_of(ckpt).model
    portrait = np.asarray(Image.open(ASSETS / "demo_portrait.png").convert("RGB"))
    frames, points = prepare_images([portrait], ["demo_portrait.png"], make_detector("dlib"), cfg.image_size)
    driver = LandmarkSequence.load(ASSETS / "demo_driver.npz")
    steps = np.linspace(0, len(driver) - 1, PARITY_FRAMES).round().astype(int)
    driven = transfer_motion(driver.points[steps], points[0])  # (F, 68, 2) in the portrait's crop
    drawn = draw_batch(driven, cfg.image_size, cfg.draw_style)  # (F, S, S, 3)
    mirror = frames[:, :, ::-1], draw_batch(points, cfg.image_size, cfg.draw_style)[:, :, ::-1]
    images = np.concatenate([frames, mirror[0]])  # (2, S, S, 3): the photo and its mirror image
    landmarks = np.concatenate([draw_batch(points, cfg.image_size, cfg.draw_style), mirror[1]])
    generator = {contract.LANDMARK_IMAGE: drawn}
    if cfg.warp_guided:  # the portrait, warped onto each driving frame
        generator[contract.WARPED] = warp_nearest(frames, points, driven)
    return {
        contract.KIND_EMBEDDER: {contract.IMAGE: images, contract.LANDMARK_IMAGE: landmarks},
        contract.KIND_GENERATOR: generator,
        contract.KIND_PERSONALISED: dict(generator),
    }


class Refused(Exception):
    """An export that must not go on (exit `status`): the message is for the user, one line."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def check(graph: to_onnx.Graph, path: Path, inputs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    kind = graph.metadata[contract.Meta.KIND]
    feeds = dict(inputs[kind])
    if kind == contract.KIND_GENERATOR:  # psi of the portrait, from the embedder
        embedder = to_onnx.session(path.with_name(f"{contract.EMBEDDER}.onnx"))
        adain = embedder.run([contract.ADAIN], inputs[contract.KIND_EMBEDDER])[0]
        feeds[contract.ADAIN] = np.repeat(adain[:1], len(feeds[contract.LANDMARK_IMAGE]), axis=0)
    figures = to_onnx.parity(
        graph, path, {name: feeds[name] for name in graph.inputs}
    )  # in the graph's order
    for p in figures:
        log.info(
            "parity %s.%s vs PyTorch: max |diff| %.3g, mean %.3g (%s)",
            p.model,
            p.output,
            p.max_abs,
            p.mean_abs,
            p.unit,
        )
    for p in figures:  # the gate: a model that does not compute what PyTorch does is not served
        limit = to_onnx.Templates.IMAGE_LEVELS if p.unit == "uint8 levels" else to_onnx.Templates.FLOAT_ABS
        if not p.max_abs <= limit:  # NaN fails too
            raise Refused(
                f"{p.model}.{p.output} differs from PyTorch by {p.max_abs:.3g} {p.unit} (at most {limit:g}): "
                "nothing written",
                status=1,
            )
    latency = {f"batch_{b}": round(to_onnx.latency_ms(path, b), 2) for b in (1, 8)}
    log.info("onnxruntime CPU latency %s: %s ms", graph.name, latency)
    return {"parity": [vars(p) for p in figures], "latency_ms": latency}


def load_checkpoint(path: Path) -> tuple[dict[str, Any], list[to_onnx.Graph]]:
    """The checkpoint and the models it exports to; Refused (one line) when it cannot be read as a
    talkinghead checkpoint (missing, a folder, cut short, another file, another version)."""
    what = f"--checkpoint {path}"
    if not path.is_file():
        raise Refused(f"{what}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        ckpt = checkpoint.load(path)
        return ckpt, to_onnx.graphs(ckpt)
    except ValueError as error:  # (checkpoint.load's: cut short, another file, another version)
        raise Refused(f"{what}: {str(error).removeprefix(f'{path}: ').removeprefix(f'{path} ')}") from None
    except (KeyError, OSError) as error:
        raise Refused(f"{what}: not a readable talkinghead checkpoint ({type(error).__name__})") from None


def check_writable(repository: Path, report: Path) -> None:
    """Refused, before any work, when the repository or the report's folder cannot be written."""
    if repository.exists() and not repository.is_dir():
        raise Refused(f"--repository {repository}: exists and is not a directory")
    folder = report.parent
    if not folder.is_dir() and folder.resolve() != repository.resolve().parent:
        raise Refused(f"--report {report}: no folder {folder}")
    try:
        repository.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise Refused(f"--repository {repository}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK) or not os.access(repository, os.W_OK):
        where = folder if not os.access(folder, os.W_OK) else repository
        raise Refused(f"{where}: not writable (the repository and its report are written there)")


def export(
    args: argparse.Namespace, loaded: tuple[dict[str, Any], list[to_onnx.Graph]] | None = None
) -> dict[str, Any]:
    """Export `args.checkpoint` (or the `loaded` checkpoint and its graphs) into args.repository."""
    ckpt, graphs = loaded or load_checkpoint(args.checkpoint)
    args.repository.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "profile": args.profile, "models": {}}
    inputs = None if args.no_check else real_inputs(ckpt)
    with tempfile.TemporaryDirectory(prefix="talkinghead-export-") as tmp:
        changed = []
        staged: list[tuple[to_onnx.Graph, Path, dict[str, Any]]] = []
        for graph in graphs:  # every model exported and checked first: then written, together
            if (found := to_onnx.start_from(graph, args.repository)) is not None:
                log.info("%s starts from the graph of %s", graph.name, found)
            started = time.monotonic()
            path = to_onnx.export_graph(graph, Path(tmp) / f"{graph.name}.onnx")
            entry = {"export_seconds": round(time.monotonic() - started, 1), **to_onnx.describe(path)}
            if inputs is not None:
                entry.update(check(graph, path, inputs))
            staged.append((graph, path, entry))
        for graph, path, entry in staged:
            latest = repository.versions(args.repository / graph.name)
            same = (
                latest
                and (args.repository / graph.name / str(latest[-1]) / "model.onnx").read_bytes()
                == path.read_bytes()
            )
            if same:  # already served: refresh its config, keep the version (Triton keeps it loaded)
                version_dir = repository.write_config(
                    args.repository, path, profile=args.profile, device=args.device
                )
            else:
                version_dir = repository.write_model(
                    args.repository, path, profile=args.profile, device=args.device
                )
            if graph.name == contract.GENERATOR:
                copy_verdict(args.checkpoint, version_dir)
                if args.template:
                    entry["template"] = write_template(ckpt, version_dir, Path(tmp))
            if not same:
                changed.append(graph.name)
            entry["path"] = str(version_dir)
            report["models"][graph.name] = entry
            log.info(
                "%s -> %s (%.1f MB, opset %d)", graph.name, version_dir, entry["bytes"] / 1e6, entry["opset"]
            )
    report["written"] = changed  # the models with a new version (the others were already there)
    return report


def write_template(ckpt: dict[str, Any], version_dir: Path, tmp: Path) -> dict[str, Any]:
    """The personalised generator a worker's first job starts from (to_onnx.template_graph), beside
    the shared generator: kept where one of this checkpoint is there already."""
    target = version_dir / repository.TEMPLATE_FILE
    if target.is_file():
        try:
            kept = repository.spec_of(target).parameters.get(contract.Meta.MODEL_ID)
        except Exception:  # a half-written or foreign file: written again
            kept = None
        if kept == checkpoint.fingerprint(ckpt):
            return {"path": str(target), "kept": True}
    started = time.monotonic()
    path = to_onnx.export_graph(to_onnx.template_graph(ckpt), tmp / repository.TEMPLATE_FILE)
    staged = version_dir / f".{repository.TEMPLATE_FILE}"
    shutil.copyfile(path, staged)
    os.replace(staged, target)  # never a half-written template
    seconds = time.monotonic() - started
    log.info("personalised template -> %s in %.1f s", target, seconds)
    return {"path": str(target), "export_seconds": round(seconds, 1)}


def copy_verdict(ckpt_path: Path, version_dir: Path) -> None:
    """`<checkpoint>.engines.json` (the evaluation's verdict on lossy CPU engines, see
    facekit/engines.py) goes beside the shared generator, where the in-process backend reads it."""
    verdict = ckpt_path.with_suffix(".engines.json")
    target = version_dir / engines.VERDICT_FILE
    if verdict.is_file():
        shutil.copyfile(verdict, target)
        log.info("engine verdict %s -> %s", verdict, target)
    else:
        target.unlink(missing_ok=True)


class TritonClient:
    """tritonclient.grpc's client whose every call has a deadline (`timeout_s`): Triton frozen or
    cut off behind an open connection answers nothing, and a call without one waited forever (a
    worker's job stayed RUNNING, its heartbeat beating, for good). A call past it raises
    InferenceServerException (DEADLINE_EXCEEDED), as a refusal does."""

    def __init__(self, url: str, timeout_s: float = contract.TRITON_LOAD_TIMEOUT_S) -> None:
        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(url)
        self.timeout_s = timeout_s

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        return functools.partial(method, client_timeout=self.timeout_s)


def triton_load(url: str, names: list[str]) -> None:
    client = TritonClient(url)
    for name in names:
        client.load_model(name)
        log.info("loaded %s in Triton at %s", name, url)


def wait_unloaded(client: Any, name: str, timeout: float = 30.0) -> None:
    """Triton unloads asynchronously (the model is UNLOADING and the server not ready meanwhile):
    wait until it is gone before its files are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {m.name: m.state for m in client.get_model_repository_index().models}
        # (a model taken out of the repository is not in the index while still loaded)
        if states.get(name) not in ("READY", "UNLOADING", "LOADING") and not client.is_model_ready(name):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{name} still loaded after {timeout:.0f} s")


def remove_avatar(args: argparse.Namespace) -> int:
    try:
        name = contract.personalised_name(args.remove_avatar)
    except ValueError as error:
        raise Refused(f"--remove-avatar {args.remove_avatar!r}: {error}") from None
    hidden = repository.hide_model(args.repository, name)  # first: then nothing can load it again
    unloaded = True
    if args.triton_url:
        from tritonclient.utils import InferenceServerException

        try:
            client = TritonClient(args.triton_url)
            loaded = client.is_model_ready(name)
            client.unload_model(name)
            wait_unloaded(client, name)
            if loaded:  # (it said "unloaded" of a model Triton never had loaded)
                log.info("unloaded %s from Triton at %s", name, args.triton_url)
            else:
                log.info("%s was not loaded in Triton at %s", name, args.triton_url)
        except (InferenceServerException, TimeoutError) as err:
            log.warning("Triton could not unload %s: %s", name, err)
            unloaded = False
    if hidden is None:
        log.error("%s is not in %s", name, args.repository)
        return 1
    shutil.rmtree(hidden, ignore_errors=True)
    log.info("removed %s from %s", name, args.repository)
    if not unloaded:  # deleted, but Triton may still serve it until a worker's sweep or a restart
        log.error(
            "%s may still be loaded in Triton at %s: unload it there (a worker's sweep does) or restart it",
            name,
            args.triton_url,
        )
        return 1
    return 0


def report_path(repo: Path, names: list[str]) -> Path:
    """<repository>.export.json for the base models; <repository>.generator_<avatar>.export.json for
    an avatar's personalised generator (before, exporting one replaced the base models' report)."""
    repo = repo.resolve() if repo.name in ("", ".", "..") else repo  # ("." and ".." have no name to extend)
    avatars = sorted(name for name in names if name.startswith(contract.PERSONALISED_PREFIX))
    return repo.with_name(".".join([repo.name, *avatars, "export.json"]))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "onnxslim"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.remove_avatar:
            if args.checkpoint is not None:
                raise Refused("--remove-avatar takes no --checkpoint (it removes; export separately)")
            return remove_avatar(args)
        if args.checkpoint is None:
            raise Refused("--checkpoint is required (or --remove-avatar ID)")
        if args.device == "gpu" and args.profile != "onnxruntime":
            raise Refused(
                "--device gpu is for --profile onnxruntime (python runs CPU engines; tensorrt is the GPU's)"
            )
        ckpt, graphs = load_checkpoint(args.checkpoint)
        out = args.report or report_path(args.repository, [g.name for g in graphs])
        check_writable(args.repository, out)
        report = export(args, (ckpt, graphs))
    except Refused as refused:
        print(f"talkinghead export: {refused}", file=sys.stderr)
        return refused.status
    staging = out.with_name(f".{out.name}.partial")
    staging.write_text(json.dumps(report, indent=2) + "\n")  # (before the load: what was exported stays said)
    os.replace(staging, out)
    log.info("report: %s", out)
    if args.triton_url:
        from tritonclient.utils import InferenceServerException

        try:
            triton_load(args.triton_url, report["written"])
        except InferenceServerException as error:
            log.error(
                "Triton at %s did not load %s: %s. The repository %s holds it; is it the one that Triton "
                "serves (its --model-repository), and is Triton up?",
                args.triton_url,
                ", ".join(report["written"]),
                error.message() or error,
                args.repository,
            )
            return 1
    return 0
