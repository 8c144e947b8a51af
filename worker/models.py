"""Publishing and withdrawing an avatar's generator: the model repository and every Triton.

`publish` exports a personalised checkpoint's `generator_<avatar>` (no parity check on real
frames: the export tests hold that). It traces nothing where it can: the graph of an earlier job,
or for a worker's first job a generator the repository holds for the same base model (published,
or the template `talkinghead export` writes beside the shared generator), gets the new weights
and is checked against PyTorch (export/to_onnx.py Templates). It adds it
as a new version unless the latest one is byte-identical (a job re-run after its worker died
publishes nothing twice), then loads it in each Triton (a version a Triton refuses is taken back:
`load_everywhere`) and, past the personalised generators a Triton keeps loaded, unloads the least
recently called idle ones there, as a service replica loading one does (`trim`). `withdraw`
unloads it from each Triton, waits until Triton has let go, and removes its directory in one
rename; `withdraw_versions` takes only some of its versions (those `stamps` shows were made for
an avatar record the store no longer holds), the whole model when that is all of them;
`unload_orphans` unloads those a Triton that missed a withdrawal still holds. A Triton
URL whose host resolves to several addresses (a headless Kubernetes Service) means every one of
them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import onnx

from export import repository, to_onnx
from export.command import TritonClient, wait_unloaded
from facekit import contract

log = logging.getLogger("talkinghead.worker")

EXPORT_PREFIX = "talkinghead-worker-"  # the temp folder an export writes its ONNX file into
OWNER_FILE = ".owner"  # in it, flock'ed by the exporting process while it lives
OLD_EXPORT_S = 3600.0  # a folder without OWNER_FILE (an older worker's) this old is left over


@contextlib.contextmanager
def export_folder() -> Iterator[Path]:
    """A temp folder for one export (removed after it), marked as this process's by a lock the OS
    drops when the process dies, so `sweep_exports` can tell a folder left by a killed worker."""
    with (
        tempfile.TemporaryDirectory(prefix=EXPORT_PREFIX) as tmp,
        (Path(tmp) / OWNER_FILE).open("ab") as owner,
    ):
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield Path(tmp)


def sweep_exports(root: Path | None = None) -> list[Path]:
    """Remove the export folders of workers killed while exporting (the small model's ONNX file is
    5.6 MB, the paper-size one's ~150 MB; the embedded worker restarts in the same container, so
    they piled up in /tmp): those whose owner lock no live process holds, and those of older
    workers (no lock) untouched for OLD_EXPORT_S. What it removed."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{EXPORT_PREFIX}*"):
        try:
            if not folder.is_dir() or folder.is_symlink():
                continue
            owner = folder / OWNER_FILE
            if owner.exists():
                with owner.open("ab") as handle:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # its worker is exporting now
            elif time.time() - folder.stat().st_mtime < OLD_EXPORT_S:
                continue
            shutil.rmtree(folder)
        except OSError as error:
            log.warning("cannot remove %s, left by a worker killed while exporting: %s", folder, error)
            continue
        removed.append(folder)
    if removed:
        log.info("removed %d export folder(s) left by workers killed while exporting", len(removed))
    return removed


def targets(urls: list[str]) -> list[str]:
    """host:port URLs -> one per address of each host (every replica behind a headless Service)."""
    found: list[str] = []
    for url in urls:
        host, _, port = url.rpartition(":")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            log.warning("cannot resolve Triton host %s: %s", host, error)
            continue
        for info in infos:
            address = str(info[4][0])
            target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            if target not in found:
                found.append(target)
    return found


# Every call to a Triton gives up after this (the worker's --triton-timeout): a Triton that answers
# nothing fails the job's load (UNAVAILABLE) instead of holding it RUNNING.
timeout_s = contract.TRITON_LOAD_TIMEOUT_S


def _client(url: str) -> TritonClient:
    return TritonClient(url, timeout_s)


class Published(NamedTuple):
    name: str  # generator_<avatar>
    version: int  # the latest version, this job's generator
    written: Path | None  # its folder when this job wrote it (None: the same bytes were there)


def publish(
    ckpt: dict[str, Any],
    repo: Path,
    *,
    profile: str,
    tritons: list[str],
    max_loaded: int = contract.MAX_PERSONALISED,
    loading: Callable[[], None] | None = None,
) -> Published:
    """Export the personalised generator into `repo` and load it in every Triton (keeping at most
    `max_loaded` personalised generators there where the others are idle: `trim`); `loading` is
    called between the two (the worker's metrics time them apart)."""
    (graph,) = to_onnx.graphs(ckpt)
    if (found := to_onnx.start_from(graph, repo)) is not None:
        log.info("%s starts from the graph of %s", graph.name, found)
    with export_folder() as tmp:
        started = time.monotonic()
        path = to_onnx.export_graph(graph, tmp / f"{graph.name}.onnx")
        log.info("exported %s in %.1f s", graph.name, time.monotonic() - started)
        latest = repository.versions(repo / graph.name)
        current = repo / graph.name / str(latest[-1]) / contract.MODEL_FILE if latest else None
        if current is not None and current.is_file() and current.read_bytes() == path.read_bytes():
            version_dir = repository.write_config(repo, path, profile=profile)  # nothing new to write
            written = None
        else:
            version_dir = written = repository.write_model(repo, path, profile=profile)
    if loading is not None:
        loading()
    load_everywhere(repo, graph.name, tritons=tritons, written=written, max_loaded=max_loaded)
    return Published(graph.name, int(version_dir.name), written)


def take_back(published: Published, repo: Path, *, tritons: list[str]) -> None:
    """Undo a publish whose job was cancelled (or taken over) as it loaded: the version it wrote
    goes, as for a refusal; the avatar keeps the generator it had (before, the whole model was
    withdrawn, an earlier personalisation's versions with it)."""
    if published.written is not None:
        _take_back(repo, published.name, published.written, targets(tritons))


def load_everywhere(
    repo: Path,
    name: str,
    *,
    tritons: list[str],
    written: Path | None,
    max_loaded: int = contract.MAX_PERSONALISED,
) -> None:
    """Load model `name` in every Triton. Where one refuses (out of memory, a file it cannot
    read), the version this job wrote (`written`) is taken back - the one before it is the latest
    again and every Triton loads that, or, the model's first, the model is unloaded and removed -
    so that the repository and the Tritons agree on what the avatar has (before, the refused
    version stayed published: a new stream of the avatar asked Triton to load it again, and
    failed). Then the refusal is raised (the job fails: jobs_run.failure). Each Triton that loaded
    it is then trimmed to `max_loaded` personalised generators (`trim`)."""
    urls = targets(tritons)
    try:
        for url in urls:
            client = _client(url)
            client.load_model(name)
            log.info("loaded %s in Triton at %s", name, url)
            trim(client, url, keep=name, max_loaded=max_loaded)
    except Exception as error:
        if written is not None:
            log.warning("Triton refused %s version %s; taking it back: %s", name, written.name, error)
            try:
                _take_back(repo, name, written, urls)
            except Exception:  # the job still fails for the refusal, not for this
                log.exception("could not take %s version %s back", name, written.name)
        raise


def trim(
    client: Any, url: str, *, keep: str, max_loaded: int, idle_s: float = contract.PERSONALISED_IDLE_S
) -> None:
    """Beyond `max_loaded` personalised generators ready on this Triton, unload those no one has
    called for `idle_s` (Triton's last inference), least recently called first, never `keep` -
    the service replicas' own rule (service/backends/triton.py), which only ran when a replica
    loaded one: before, every personalisation left its generator loaded on every Triton (GPU
    memory) until a stream's load brought the count down. Failures are logged, never raised: the
    job's generator is loaded whatever happens here."""
    try:
        ready = contract.ready_personalised(client.get_model_repository_index(as_json=True))
        excess = len(ready) - max_loaded
        if excess <= 0:
            return
        called = contract.last_inference(client.get_inference_statistics(as_json=True))
    except Exception as error:
        log.warning("cannot count the personalised generators loaded in Triton at %s: %s", url, error)
        return
    for name, seconds in contract.idle_personalised(ready, called, keep=keep, idle_s=idle_s, now=time.time()):
        if excess <= 0:
            break
        try:
            client.unload_model(name)
        except Exception as error:
            log.warning("Triton at %s could not unload %s: %s", url, name, error)
            continue
        excess -= 1
        log.info(
            "unloaded personalised generator %s in Triton at %s (no call for %.0f s)", name, url, seconds
        )
    if excess > 0:
        log.warning(
            "%d personalised generators loaded in Triton at %s, above the limit of %d: the others were "
            "called in the last %.0f s",
            max_loaded + excess,
            url,
            max_loaded,
            idle_s,
        )


def take_back_since(name: str, since: int, repo: Path, *, tritons: list[str]) -> bool:
    """Take back every version of model `name` above `since`, newest first: the version `since`
    (or, with 0, no model) is what Triton serves again. Whether there was any."""
    above = [v for v in repository.versions(repo / name) if v > since]
    for version in reversed(above):
        log.info("taking back %s version %d, published by an attempt lost before it ended", name, version)
        _take_back(repo, name, repo / name / str(version), targets(tritons))
    return bool(above)


def _take_back(repo: Path, name: str, written: Path, urls: list[str]) -> None:
    from tritonclient.utils import InferenceServerException

    if repository.versions(written.parent) == [int(written.name)]:  # the model's first version
        _unload(name, urls)
        repository.remove_model(repo, name)
        return
    repository.remove_version(written)
    for url in urls:
        try:
            _client(url).load_model(name)
            log.info("loaded %s again in Triton at %s (its version before)", name, url)
        except InferenceServerException as error:
            log.warning("Triton at %s could not load %s's version before either: %s", url, name, error)


def _unload(name: str, urls: list[str]) -> None:
    """Unload `name` from each Triton and wait until it has let go of its files."""
    from tritonclient.utils import InferenceServerException

    for url in urls:
        try:
            client = _client(url)
            client.unload_model(name)
            wait_unloaded(client, name)
            log.info("unloaded %s from Triton at %s", name, url)
        except (InferenceServerException, TimeoutError) as error:
            log.warning("Triton at %s could not unload %s: %s", url, name, error)


def withdraw(avatar_id: str, repo: Path, *, tritons: list[str]) -> bool:
    """Take generator_<avatar> out of the repository, unload it from every Triton, delete it;
    whether the repository had it. Out of the repository first: unloaded while still there, a
    replica whose stream was using it loaded it again at its next call (the model is loaded
    on first use), and it stayed in Triton, serving the deleted avatar's stream, for good."""
    name = contract.personalised_name(avatar_id)
    hidden = repository.hide_model(repo, name)
    _unload(name, targets(tritons))
    if hidden is not None:
        shutil.rmtree(hidden, ignore_errors=True)  # (or the next removal's sweep)
    return hidden is not None


def unload_orphans(repo: Path, *, tritons: list[str]) -> list[str]:
    """Unload, in every Triton, the personalised generators loaded there whose folder `repo` no
    longer holds: withdrawn while that Triton could not be told (not behind its Service's name
    then, unreachable). Triton's repository index lists folders, so no loaded-generator limit
    (`trim`, the replicas') counted them, and they held their memory until that Triton restarted.
    One `repo` holds is never touched, and one with no folder can no longer be loaded by anyone,
    a running stream's replica included. Failures are logged. `name@address` of each unloaded."""
    unloaded = []
    for url in targets(tritons):
        try:
            client = _client(url)
            statistics = client.get_inference_statistics(as_json=True)  # (the models loaded)
        except Exception as error:
            log.warning("cannot list the models loaded in Triton at %s: %s", url, error)
            continue
        loaded = {str(s.get("name", "")) for s in statistics.get("model_stats", [])}
        present = set(repository.models(repo))  # (read after the statistics: a new one is on disk)
        for name in sorted(loaded - present):
            if not name.startswith(contract.PERSONALISED_PREFIX):
                continue
            try:
                client.unload_model(name)
            except Exception as error:
                log.warning("Triton at %s could not unload %s: %s", url, name, error)
                continue
            log.warning(
                "unloaded %s in Triton at %s: loaded there, but withdrawn from the repository", name, url
            )
            unloaded.append(f"{name}@{url}")
    return unloaded


def stamps(repo: Path, name: str, key: str = contract.Meta.AVATAR_CREATED) -> dict[int, str | None]:
    """Each version of model `name` -> the avatar record it was fine-tuned on, as its
    Meta.AVATAR_CREATED stamp (None: it carries none - exported before stamps, or by hand from a
    checkpoint fine-tuned outside the service - or its file cannot be read); with `key`
    Meta.AVATAR_STORE, the store that record was in."""
    found: dict[int, str | None] = {}
    for version in repository.versions(repo / name):
        path = repo / name / str(version) / contract.MODEL_FILE
        try:
            status = path.stat()
            found[version] = _metadata(str(path), status.st_mtime_ns, status.st_size).get(key) or None
        except Exception as error:  # gone meanwhile, or not an ONNX file we can read
            log.warning("cannot read the avatar stamp of %s: %s", path, error)
            found[version] = None
    return found


@functools.lru_cache(maxsize=1024)
def _metadata(path: str, mtime_ns: int, size: int) -> dict[str, str]:
    """(a version's file is written once: what its path, time and size name is read once)"""
    model = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def withdraw_versions(avatar_id: str, doomed: list[int], repo: Path, *, tritons: list[str]) -> bool:
    """Take versions `doomed` of generator_<avatar> away: the whole model (`withdraw`) when they
    are all it has, else each of them (the version before it serves again, in every Triton).
    Whether there was any of them to take."""
    name = contract.personalised_name(avatar_id)
    now = repository.versions(repo / name)
    doomed = [v for v in doomed if v in now]
    if not doomed:
        return False
    if set(now) <= set(doomed):
        return withdraw(avatar_id, repo, tritons=tritons)
    urls = targets(tritons)
    for version in sorted(doomed, reverse=True):
        log.info("withdrawing %s version %d", name, version)
        _take_back(repo, name, repo / name / str(version), urls)
    return True
