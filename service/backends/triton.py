"""NVIDIA Triton backend over gRPC (tritonclient.grpc.aio), for production deployments.

Triton runs in explicit model-control mode: the service loads `embedder` and `generator` when it
connects and `generator_<avatar>` the first time that avatar streams (load_model). Model metadata
(the talkinghead.* keys) comes from each model's config.pbtxt parameters. A monitor task polls the
server every `poll_s` seconds; while Triton is down every call raises BackendUnavailable (the
service answers UNAVAILABLE and reports NOT_SERVING) and the models are loaded again when it
returns. Batching across streams happens in the service's batcher; Triton's dynamic batcher may
merge further across replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from facekit.contract import (
    ADAIN,
    EMBEDDER,
    EMBEDDING,
    GENERATOR,
    IMAGE,
    LANDMARK_IMAGE,
    Meta,
    ModelInfo,
    personalised_name,
)
from service.backends.base import BackendUnavailable, ReadyGate, check_images, generator_feeds

log = logging.getLogger("talkinghead.service.triton")
NEGATIVE_CACHE_S = 10.0  # how long "no personalised model for this avatar" is remembered


class TritonBackend(ReadyGate):
    name = "triton"

    def __init__(self, *, url: str, poll_s: float = 1.0, timeout_s: float = 30.0) -> None:
        self.url = url
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._client: triton.InferenceServerClient | None = None
        self._info: ModelInfo | None = None
        self._ready = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None
        self._personalised: dict[str, bool] = {}
        self._absent_since: dict[str, float] = {}

    async def start(self) -> None:
        self._client = triton.InferenceServerClient(self.url)
        self._monitor = asyncio.create_task(self._watch(), name="triton-monitor")

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self._client is not None:
            await self._client.close()

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise BackendUnavailable(f"Triton at {self.url} is not ready")
        return self._info

    @property
    def client(self) -> triton.InferenceServerClient:
        if self._client is None:
            raise BackendUnavailable("the Triton backend is not started")
        return self._client

    async def _serving(self) -> bool:
        """Whether Triton can run our models. Once they are loaded this asks the base models, not
        the server: Triton reports itself not ready while it loads or unloads any model (a new
        personalised generator), though the loaded ones serve on."""
        if not self._ready.is_set():
            return bool(await self.client.is_server_ready(client_timeout=self.timeout_s))
        for model in (EMBEDDER, GENERATOR):
            if not await self.client.is_model_ready(model, client_timeout=self.timeout_s):
                return False
        return True

    async def _watch(self) -> None:
        while True:
            try:
                up = await self._serving()
                if up and not self._ready.is_set():
                    await self._load_base()
                elif not up:
                    self._lost("server not ready")
            except (InferenceServerException, BackendUnavailable, OSError) as error:
                self._lost(str(error))
            await asyncio.sleep(self.poll_s)

    def _lost(self, why: str) -> None:
        if self._ready.is_set():
            log.error("Triton at %s went away: %s", self.url, why)
        self._ready.clear()
        self._personalised.clear()

    async def _parameters(self, model: str) -> dict[str, str]:
        config = await self.client.get_model_config(model, as_json=True, client_timeout=self.timeout_s)
        params = config["config"].get("parameters", {})
        return {key: value.get("string_value", "") for key, value in params.items()}

    async def _load_base(self) -> None:
        for model in (EMBEDDER, GENERATOR):
            if not await self.client.is_model_ready(model, client_timeout=self.timeout_s):
                await self.client.load_model(model, client_timeout=self.timeout_s)
        self._info = ModelInfo.from_metadata(
            await self._parameters(GENERATOR), where=f"{self.url}/{GENERATOR}"
        )
        embedder_id = (await self._parameters(EMBEDDER)).get(Meta.MODEL_ID)
        if embedder_id != self._info.model_id:
            raise BackendUnavailable(f"{self.url}: embedder and generator come from different models")
        self._ready.set()
        log.info("Triton at %s ready: %s", self.url, self._info)

    async def _infer(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        if not self.is_ready():
            raise BackendUnavailable(f"Triton at {self.url} is not ready")
        inputs = []
        for name, array in feeds.items():
            tensor = triton.InferInput(
                name, list(array.shape), "UINT8" if array.dtype == np.uint8 else "FP32"
            )
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(tensor)
        requested = [triton.InferRequestedOutput(name) for name in outputs]
        try:
            result = await self.client.infer(model, inputs, outputs=requested, client_timeout=self.timeout_s)
        except InferenceServerException as error:
            status = str(error.status() or "")
            if "UNAVAILABLE" in status or "DEADLINE" in status:
                self._lost(str(error))
            raise BackendUnavailable(f"Triton {model}: {error.message()}") from error
        return [result.as_numpy(name) for name in outputs]

    async def embed(self, images: np.ndarray, landmark_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.info.image_size
        check_images(images, size, name=IMAGE)
        check_images(landmark_images, size, name=LANDMARK_IMAGE)
        embedding, adain = await self._infer(
            EMBEDDER, {IMAGE: images, LANDMARK_IMAGE: landmark_images}, [EMBEDDING, ADAIN]
        )
        return embedding.astype(np.float32), adain.astype(np.float32)

    async def generate(
        self, landmark_images: np.ndarray, adain: np.ndarray, warped: np.ndarray | None = None
    ) -> np.ndarray:
        feeds = generator_feeds(self.info, landmark_images, adain, warped)
        (image,) = await self._infer(GENERATOR, feeds, [IMAGE])
        return image

    async def has_personalised(self, avatar_id: str) -> bool:
        """Load `generator_<id>` on first use; a missing one is remembered for NEGATIVE_CACHE_S."""
        name = personalised_name(avatar_id)
        if self._personalised.get(name):
            return True
        if time.monotonic() - self._absent_since.get(name, -1e9) < NEGATIVE_CACHE_S or not self.is_ready():
            return False
        try:
            index = await self.client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
            if name not in {m.get("name") for m in index.get("models", [])}:
                self._absent_since[name] = time.monotonic()
                return False
            if not await self.client.is_model_ready(name, client_timeout=self.timeout_s):
                await self.client.load_model(name, client_timeout=self.timeout_s)  # else the worker did
            params = await self._parameters(name)
        except InferenceServerException as error:
            log.error("cannot load %s on Triton: %s", name, error)
            return False
        if params.get(Meta.MODEL_ID) != self.info.model_id:
            log.warning("%s was fine-tuned from another base model; using the shared generator", name)
            return False
        self._personalised[name] = True
        return True

    def forget_personalised(self, avatar_id: str) -> None:
        name = personalised_name(avatar_id)
        self._personalised.pop(name, None)
        self._absent_since.pop(name, None)

    async def generate_personalised(
        self, avatar_id: str, landmark_images: np.ndarray, warped: np.ndarray | None = None
    ) -> np.ndarray:
        feeds = generator_feeds(self.info, landmark_images, None, warped)
        (image,) = await self._infer(personalised_name(avatar_id), feeds, [IMAGE])
        return image
