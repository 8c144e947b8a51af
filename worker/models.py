"""Publishing and withdrawing an avatar's generator: the model repository and every Triton.

`publish` exports a personalised checkpoint's `generator_<avatar>` (no parity check on real
frames: the export tests hold that). It traces nothing where it can: the graph of an earlier job,
or for a worker's first job a generator the repository holds for the same base model (published,
or the template `talkinghead export` writes beside the shared generator), gets the new weights
and is checked against PyTorch (export/to_onnx.py Templates). It adds it
as a new version unless the latest one is byte-identical (a job re-run after its worker died
publishes nothing twice), then loads it in each Triton. `withdraw` unloads it from each Triton,
waits until Triton has let go, and removes its directory in one rename. A Triton URL whose host
resolves to several addresses (a headless Kubernetes Service) means every one of them.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from export import repository, to_onnx
from export.command import wait_unloaded
from facekit import contract

log = logging.getLogger("talkinghead.worker")


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


def _client(url: str) -> Any:
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url)


def publish(ckpt: dict[str, Any], repo: Path, *, profile: str, tritons: list[str]) -> tuple[str, int]:
    """Export the personalised generator into `repo` and load it in every Triton: (name, version)."""
    (graph,) = to_onnx.graphs(ckpt)
    if (found := to_onnx.start_from(graph, repo)) is not None:
        log.info("%s starts from the graph of %s", graph.name, found)
    with tempfile.TemporaryDirectory(prefix="talkinghead-worker-") as tmp:
        started = time.monotonic()
        path = to_onnx.export_graph(graph, Path(tmp) / f"{graph.name}.onnx")
        log.info("exported %s in %.1f s", graph.name, time.monotonic() - started)
        latest = repository.versions(repo / graph.name)
        current = repo / graph.name / str(latest[-1]) / contract.MODEL_FILE if latest else None
        if current is not None and current.is_file() and current.read_bytes() == path.read_bytes():
            version_dir = repository.write_config(repo, path, profile=profile)  # nothing new to write
        else:
            version_dir = repository.write_model(repo, path, profile=profile)
    for url in targets(tritons):
        _client(url).load_model(graph.name)
        log.info("loaded %s in Triton at %s", graph.name, url)
    return graph.name, int(version_dir.name)


def withdraw(avatar_id: str, repo: Path, *, tritons: list[str]) -> bool:
    """Unload generator_<avatar> from every Triton and delete it; whether the repository had it."""
    from tritonclient.utils import InferenceServerException

    name = contract.personalised_name(avatar_id)
    for url in targets(tritons):
        try:
            client = _client(url)
            client.unload_model(name)
            wait_unloaded(client, name)
            log.info("unloaded %s from Triton at %s", name, url)
        except (InferenceServerException, TimeoutError) as error:
            log.warning("Triton at %s could not unload %s: %s", url, name, error)
    return repository.remove_model(repo, name)
