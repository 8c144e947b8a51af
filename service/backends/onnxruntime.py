"""In-process backend: the model repository's ONNX files, run on this machine's CPU in a thread pool.

The embedder runs in ONNX Runtime; the generators run on the engine `engine` names
(facekit/engines.py). With `auto` (the default) the shared generator is timed at start on every
engine allowed for it (fp32 ONNX Runtime and OpenVINO; OpenVINO bf16 only where the model's
engines.json verdict passed it on the evaluation people) and the fastest serves; the choice and
the timings are logged. Personalised generators use the same engine when it is an exact (fp32)
one, else the fastest exact one: the verdict was measured on the shared weights.

Runs happen in a thread pool, off the asyncio loop. Generators are opened in `lanes` lanes
(facekit/engines.py): up to `lanes` calls of one generator run side by side, each on its share of
the threads, and the batcher keeps that many batches of a model in flight (`lanes(model)`) and
two more, which wait in the engine for lanes to free (live ones first, `priority`); the embedder
runs on all threads, one call at a time. The pool has a thread for each of those, one for a live
call beside them and one more, so batches of different models (the shared generator, a
personalised one, the embedder) also run side by side and a slow batch of one model does not hold
up the others. Every run
has the backend deadline: one that overruns is terminated (RunOptions.terminate) and answered
UNAVAILABLE. Missing models are polled for every `poll_s` seconds, so a server started before
`make model-repository` becomes ready when the files appear.

Personalised generators load on first use and stay loaded while used: each costs its engine's
memory (~100 MiB for the committed model on OpenVINO once it has run), so beyond
`max_personalised` loaded at once the least recently used of those idle for `personalised_idle_s`
are unloaded when another loads; a stream of an unloaded one loads it again on its next frame.
Generators in use are never unloaded, so the limit is exceeded (with a warning) only by avatars
streamed at the same time.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from facekit import cpus, engines
from facekit.contract import (
    ADAIN,
    EMBEDDER,
    EMBEDDING,
    GENERATOR,
    IMAGE,
    LANDMARK_IMAGE,
    MAX_PERSONALISED,
    PERSONALISED_IDLE_S,
    Meta,
    ModelInfo,
    latest_version,
    personalised_name,
)
from facekit.contract import (
    made_for as made_for_record,
)
from service.backends.base import (
    BackendUnavailable,
    InFlight,
    ReadyGate,
    check_images,
    generator_feeds,
    withdrawn,
)
from service.metrics import ENGINE_CALLS

log = logging.getLogger("talkinghead.service.onnxruntime")
RUN_THREADS = 2  # concurrent runs (and model loads), at least; see the pool below where more


class OnnxRuntimeBackend(ReadyGate):
    name = "onnxruntime"
    remote_inference = False  # the engines share this process's cores with drawing
    batches_cheaper = False  # on this CPU: no engine ran cheaper per frame in batches (App._calibrate)

    def __init__(
        self,
        *,
        repository: Path,
        engine: str = "auto",
        threads: int = 0,
        lanes: int = 1,
        poll_s: float = 1.0,
        timeout_s: float = 5.0,
        stall_s: float = 1.5,
        max_personalised: int = MAX_PERSONALISED,
        personalised_idle_s: float = PERSONALISED_IDLE_S,
    ) -> None:
        if engine not in ("auto", *engines.ENGINES):
            raise ValueError(f"unknown engine {engine!r}")
        if max_personalised < 1:
            raise ValueError(f"max_personalised must be >= 1, got {max_personalised}")
        self.repository = Path(repository)
        self.requested_engine = engine
        self.engine: str | None = None  # the shared generator's engine, once loaded
        self._exact_engine = engines.ONNXRUNTIME  # personalised generators' engine when `engine` is lossy
        # The pod's CPUs (affinity, cgroup quota), not the node's: os.cpu_count() on a 64-core node
        # with limits.cpu 2 gave 64 threads, throttled in a quota of 2 (facekit/cpus.py).
        found = cpus.cpus()
        self.threads = threads or found.usable
        self.generator_lanes = engines.resolve_lanes(self.threads, lanes)
        log.info(
            "ONNX Runtime: %d inference threads (%s), generator in %d lane(s); %s",
            self.threads,
            "--inference-threads / TALKINGHEAD_INFERENCE_THREADS" if threads else "one per usable CPU",
            self.generator_lanes,
            found.describe(),
        )
        self.poll_s = poll_s
        self._pool = ThreadPoolExecutor(
            # The shared generator's calls in flight (engines.in_flight), a live one beside them,
            # and another model's call.
            max_workers=max(RUN_THREADS, engines.in_flight(self.generator_lanes) + 2),
            thread_name_prefix=ENGINE_CALLS,
        )
        self._sessions: dict[str, engines.Engine] = {}
        self.max_personalised, self.personalised_idle_s = max_personalised, personalised_idle_s
        # Loaded personalised generators by session name -> when last called, least recent first.
        self._last_used: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._in_flight = InFlight()
        self._info: ModelInfo | None = None
        self.init_gate(timeout_s=timeout_s, stall_s=stall_s)
        self._loader: asyncio.Task[None] | None = None
        self.loads = 0

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._loader = asyncio.create_task(self._load_base(), name="onnxruntime-loader")

    async def close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
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
                    self._sessions[EMBEDDER] = await loop.run_in_executor(
                        self._pool, self._open, paths[EMBEDDER], engines.ONNXRUNTIME
                    )
                    self._sessions[GENERATOR] = await loop.run_in_executor(
                        self._pool, self._open_generator, paths[GENERATOR]
                    )
                    self._info = self._read_info(self._sessions[GENERATOR], paths[GENERATOR])
                    self._check_embedder(paths[EMBEDDER])
                except Exception as error:  # a half-written or foreign file: log, retry later
                    log.error("cannot load models from %s: %s", self.repository, error)
                    self._sessions.clear()
                    self._info = None
                else:
                    log.info("loaded %s (%s)", ", ".join(str(p) for p in paths.values()), self._info)
                    self.loads += 1
                    self._ready.set()
                    return
            elif not waiting_logged:
                log.warning("waiting for %s and %s in %s", EMBEDDER, GENERATOR, self.repository)
                waiting_logged = True
            await asyncio.sleep(self.poll_s)

    def _open(self, path: Path, engine: str, lanes: int = 1) -> engines.Engine:
        return engines.open_engine(path, engine, threads=self.threads, lanes=lanes)

    def _open_generator(self, path: Path) -> engines.Engine:
        """The shared generator on the configured engine, or with `auto` on the fastest allowed."""
        chosen = engines.pick(path, self.requested_engine, threads=self.threads, lanes=self.generator_lanes)
        self.engine, self._exact_engine = chosen.engine.name, chosen.exact
        log.info(
            "generator engine: %s in %d lane(s) (%s)", self.engine, chosen.engine.lanes, chosen.describe()
        )
        return chosen.engine

    @staticmethod
    def _read_info(session: engines.Engine, path: Path) -> ModelInfo:
        return ModelInfo.from_metadata(session.metadata, where=str(path))

    def _check_embedder(self, path: Path) -> None:
        meta = self._sessions[EMBEDDER].metadata
        assert self._info is not None
        if meta.get(Meta.MODEL_ID) != self._info.model_id:
            raise ValueError(f"{path}: embedder and generator come from different models")

    # -- inference ----------------------------------------------------------------------------
    async def _run(
        self, name: str, feeds: dict[str, np.ndarray], outputs: list[str], priority: int = engines.OFFLINE
    ) -> list[Any]:
        session = self._sessions.get(name)
        if session is None:
            raise BackendUnavailable(f"model {name} is not loaded", reason=f"the {name} is not loaded")
        cancel = engines.Cancel()
        try:
            with self._in_flight.call(name):  # (not unloaded while it runs)
                run = asyncio.get_running_loop().run_in_executor(
                    self._pool, session.run, feeds, outputs, cancel, priority
                )
                return await self.call(name, run, give_up=cancel.cancel)
        finally:
            self._used(name)

    def _used(self, name: str) -> None:
        if name in self._last_used:
            self._last_used[name] = time.monotonic()
            self._last_used.move_to_end(name)

    async def embed(self, images: np.ndarray, landmark_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.info.image_size
        check_images(images, size, name=IMAGE)
        check_images(landmark_images, size, name=LANDMARK_IMAGE)
        embedding, adain = await self._run(
            EMBEDDER, {IMAGE: images, LANDMARK_IMAGE: landmark_images}, [EMBEDDING, ADAIN]
        )
        return np.asarray(embedding, np.float32), np.asarray(adain, np.float32)

    def lanes(self, avatar_id: str = "") -> int:
        """Calls of the shared generator (avatar_id "") or a personalised one that run side by side."""
        session = self._sessions.get(personalised_name(avatar_id) if avatar_id else GENERATOR)
        return session.lanes if session is not None else self.generator_lanes

    async def generate(
        self,
        landmark_images: np.ndarray,
        adain: np.ndarray,
        warped: np.ndarray | None = None,
        *,
        priority: int = engines.OFFLINE,
    ) -> np.ndarray:
        feeds = generator_feeds(self.info, landmark_images, adain, warped)
        (image,) = await self._run(GENERATOR, feeds, [IMAGE], priority)
        return np.asarray(image)

    async def has_personalised(self, avatar_id: str, made_for: str = "") -> bool:
        name = personalised_name(avatar_id)
        if name in self._sessions:
            return made_for_record(self._sessions[name].metadata.get(Meta.AVATAR_CREATED), made_for)
        path = latest_version(self.repository / name)
        if path is None or not self.loaded():
            return False
        loop = asyncio.get_running_loop()
        try:
            session = await loop.run_in_executor(
                self._pool, self._open, path, self._exact_engine, self.generator_lanes
            )
        except Exception as error:
            log.error("cannot load %s: %s", path, error)
            return False
        meta = session.metadata
        if meta.get(Meta.MODEL_ID) != self.info.model_id:
            log.warning("%s was fine-tuned from another base model; using the shared generator", path)
            return False
        self._sessions[name] = session
        self._last_used[name] = time.monotonic()
        log.info("loaded personalised generator %s (%s)", path, session.name)
        self._unload_idle()
        return made_for_record(meta.get(Meta.AVATAR_CREATED), made_for)

    def _unload_idle(self) -> None:
        """Beyond max_personalised loaded, unload the least recently used personalised generators
        idle for personalised_idle_s (none with a run in flight)."""
        excess = len(self._last_used) - self.max_personalised
        now = time.monotonic()
        for name, used in list(self._last_used.items()):
            if excess <= 0 or now - used < self.personalised_idle_s:
                break  # (least recent first: the rest were used later still)
            if name in self._in_flight:
                continue
            self._sessions.pop(name, None)
            del self._last_used[name]
            excess -= 1
            log.info("unloaded personalised generator %s (unused for %.0f s)", name, now - used)
        if excess > 0:
            log.warning(
                "%d personalised generators loaded, above the limit of %d: the others were used in "
                "the last %.0f s",
                len(self._last_used),
                self.max_personalised,
                self.personalised_idle_s,
            )

    def loaded_personalised(self) -> int:
        return len(self._last_used)

    async def generate_personalised(
        self,
        avatar_id: str,
        landmark_images: np.ndarray,
        warped: np.ndarray | None = None,
        *,
        priority: int = engines.OFFLINE,
        made_for: str = "",
    ) -> np.ndarray:
        feeds = generator_feeds(self.info, landmark_images, None, warped)
        name = personalised_name(avatar_id)
        # A stream that opened on this generator keeps it: when an avatar event dropped the
        # session meanwhile (a newer version published), the latest file is opened again here -
        # if it was fine-tuned on the stream's record (`made_for`): one made for the record that
        # replaced it under the same id draws another face.
        if name not in self._sessions:
            await self.has_personalised(avatar_id, made_for)
        session = self._sessions.get(name)
        if session is None or not made_for_record(session.metadata.get(Meta.AVATAR_CREATED), made_for):
            raise withdrawn(name)
        (image,) = await self._run(name, feeds, [IMAGE], priority)  # (this session: no await between)
        return np.asarray(image)

    def forget_personalised(self, avatar_id: str) -> None:
        """Drop a loaded personalised session (deleted, or a newer version was published)."""
        self._sessions.pop(personalised_name(avatar_id), None)
        self._last_used.pop(personalised_name(avatar_id), None)

    def forget_all_personalised(self) -> None:
        for name in list(self._last_used):
            self._sessions.pop(name, None)
        self._last_used.clear()
