"""In-process ONNX Runtime backend: the model repository's ONNX files, run in a small thread pool.

Runs happen in RUN_THREADS threads, off the asyncio loop. Each run already uses every core through
ONNX Runtime's intra-op threads, so one run at a time would be fastest; two let the batches of
different models (the shared generator, a personalised one, the embedder) run side by side, so a
slow batch of one model does not hold up the others (they share the cores meanwhile). Every run
has the backend deadline: one that overruns is terminated (RunOptions.terminate) and answered
UNAVAILABLE. Missing models are polled for every `poll_s` seconds, so a server started before
`make model-repository` becomes ready when the files appear. Personalised generators load on
first use.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from facekit.contract import (
    ADAIN,
    EMBEDDER,
    EMBEDDING,
    GENERATOR,
    IMAGE,
    LANDMARK_IMAGE,
    Meta,
    ModelInfo,
    latest_version,
    personalised_name,
)
from service.backends.base import BackendUnavailable, ReadyGate, check_images, generator_feeds

log = logging.getLogger("talkinghead.service.onnxruntime")
RUN_THREADS = 2  # concurrent runs (and model loads)


class OnnxRuntimeBackend(ReadyGate):
    name = "onnxruntime"

    def __init__(
        self,
        *,
        repository: Path,
        threads: int = 0,
        poll_s: float = 1.0,
        timeout_s: float = 5.0,
        stall_s: float = 1.5,
    ) -> None:
        self.repository = Path(repository)
        self.threads = threads or os.cpu_count() or 1
        self.poll_s = poll_s
        self._pool = ThreadPoolExecutor(max_workers=RUN_THREADS, thread_name_prefix="onnxruntime")
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._info: ModelInfo | None = None
        self.init_gate(timeout_s=timeout_s, stall_s=stall_s)
        self._loader: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._loader = asyncio.create_task(self._load_base(), name="onnxruntime-loader")

    async def close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise BackendUnavailable(f"the models in {self.repository} are not loaded yet")
        return self._info

    async def _load_base(self) -> None:
        waiting_logged = False
        while True:
            found = {name: latest_version(self.repository / name) for name in (EMBEDDER, GENERATOR)}
            paths = {name: path for name, path in found.items() if path is not None}
            if len(paths) == len(found):
                try:
                    loop = asyncio.get_running_loop()
                    for name, path in paths.items():
                        self._sessions[name] = await loop.run_in_executor(self._pool, self._session, path)
                    self._info = self._read_info(self._sessions[GENERATOR], paths[GENERATOR])
                    self._check_embedder(paths[EMBEDDER])
                except Exception as error:  # a half-written or foreign file: log, retry later
                    log.error("cannot load models from %s: %s", self.repository, error)
                    self._sessions.clear()
                    self._info = None
                else:
                    log.info("loaded %s (%s)", ", ".join(str(p) for p in paths.values()), self._info)
                    self._ready.set()
                    return
            elif not waiting_logged:
                log.warning("waiting for %s and %s in %s", EMBEDDER, GENERATOR, self.repository)
                waiting_logged = True
            await asyncio.sleep(self.poll_s)

    def _session(self, path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spinning would steal the cores the asyncio loop needs between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @staticmethod
    def _metadata(session: ort.InferenceSession) -> dict[str, str]:
        return dict(session.get_modelmeta().custom_metadata_map)

    def _read_info(self, session: ort.InferenceSession, path: Path) -> ModelInfo:
        return ModelInfo.from_metadata(self._metadata(session), where=str(path))

    def _check_embedder(self, path: Path) -> None:
        meta = self._metadata(self._sessions[EMBEDDER])
        assert self._info is not None
        if meta.get(Meta.MODEL_ID) != self._info.model_id:
            raise ValueError(f"{path}: embedder and generator come from different models")

    # -- inference ----------------------------------------------------------------------------
    async def _run(self, name: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[Any]:
        session = self._sessions.get(name)
        if session is None:
            raise BackendUnavailable(f"model {name} is not loaded")
        options = ort.RunOptions()
        run = asyncio.get_running_loop().run_in_executor(self._pool, session.run, outputs, feeds, options)
        return await self.call(name, run, give_up=lambda: setattr(options, "terminate", True))

    async def embed(self, images: np.ndarray, landmark_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.info.image_size
        check_images(images, size, name=IMAGE)
        check_images(landmark_images, size, name=LANDMARK_IMAGE)
        embedding, adain = await self._run(
            EMBEDDER, {IMAGE: images, LANDMARK_IMAGE: landmark_images}, [EMBEDDING, ADAIN]
        )
        return np.asarray(embedding, np.float32), np.asarray(adain, np.float32)

    async def generate(
        self, landmark_images: np.ndarray, adain: np.ndarray, warped: np.ndarray | None = None
    ) -> np.ndarray:
        feeds = generator_feeds(self.info, landmark_images, adain, warped)
        (image,) = await self._run(GENERATOR, feeds, [IMAGE])
        return np.asarray(image)

    async def has_personalised(self, avatar_id: str) -> bool:
        name = personalised_name(avatar_id)
        if name in self._sessions:
            return True
        path = latest_version(self.repository / name)
        if path is None or not self.loaded():
            return False
        loop = asyncio.get_running_loop()
        try:
            session = await loop.run_in_executor(self._pool, self._session, path)
        except Exception as error:
            log.error("cannot load %s: %s", path, error)
            return False
        meta = self._metadata(session)
        if meta.get(Meta.MODEL_ID) != self.info.model_id:
            log.warning("%s was fine-tuned from another base model; using the shared generator", path)
            return False
        self._sessions[name] = session
        log.info("loaded personalised generator %s", path)
        return True

    async def generate_personalised(
        self, avatar_id: str, landmark_images: np.ndarray, warped: np.ndarray | None = None
    ) -> np.ndarray:
        feeds = generator_feeds(self.info, landmark_images, None, warped)
        # A stream that opened on this generator keeps it: when an avatar event dropped the
        # session meanwhile (a newer version published), the latest file is opened again here.
        if personalised_name(avatar_id) not in self._sessions:
            await self.has_personalised(avatar_id)
        (image,) = await self._run(personalised_name(avatar_id), feeds, [IMAGE])
        return np.asarray(image)

    def forget_personalised(self, avatar_id: str) -> None:
        """Drop a loaded personalised session (deleted, or a newer version was published)."""
        self._sessions.pop(personalised_name(avatar_id), None)
