"""NVIDIA Triton backend over gRPC (tritonclient.grpc.aio), for production deployments.

Triton runs in explicit model-control mode: the service loads `embedder` and `generator` when it
connects and `generator_<avatar>` the first time that avatar streams (load_model). Beyond
`max_personalised` personalised generators ready on Triton (every replica's and the worker's), one
loading unloads those no replica has called for `personalised_idle_s`, least recently called first
(Triton's own statistics). A personalised call names the version it was checked against (the
one ready when this replica looked it up: `Pinned`), never "the latest": a stream's frames come
from one known generator, whose stamp matched its record. When Triton has let go of that version
(the worker loaded a newer one: Triton keeps one version loaded; or another replica made room)
the call is answered "not ready" (`NotLoaded`, not a lost Triton), and the replica looks the
generator up again - loading it where needed - and moves its streams to what Triton serves now,
once, if that was fine-tuned on the stream's record (else `withdrawn`). Model metadata
(the talkinghead.* keys) comes from each model's config.pbtxt parameters. A monitor task polls the
server every `poll_s` seconds with a short deadline (`ready_timeout_s`, counted while the event loop
runs: a pause of this process is not Triton's): a Triton that does not answer (killed, frozen,
unreachable) is lost within poll_s + ready_timeout_s (1.25 s); then the calls
in flight fail at once and every new call raises BackendUnavailable (the service answers UNAVAILABLE
and reports NOT_SERVING), and the models are loaded again when it returns (the channel reconnects
within a second: its reconnect backoff is capped). Every inference has the backend deadline
(`timeout_s`); model loads and metadata have `load_timeout_s`. Batching across streams happens in
the service's batcher; Triton's dynamic batcher may merge further across replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import NamedTuple

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from facekit.contract import (
    ADAIN,
    EMBEDDER,
    EMBEDDING,
    GENERATOR,
    IMAGE,
    LANDMARK_IMAGE,
    MAX_PERSONALISED,
    PERSONALISED_IDLE_S,
    TRITON_LOAD_TIMEOUT_S,
    TRITON_PRIORITY_LIVE,
    TRITON_PRIORITY_OFFLINE,
    Meta,
    ModelInfo,
    idle_personalised,
    instances,
    last_inference,
    personalised_name,
    ready_personalised,
)
from facekit.contract import (
    made_for as made_for_record,
)
from facekit.engines import LIVE, OFFLINE
from service.backends.base import (
    BackendUnavailable,
    InFlight,
    ReadyGate,
    check_images,
    generator_feeds,
    withdrawn,
)

log = logging.getLogger("talkinghead.service.triton")
NEGATIVE_CACHE_S = 10.0  # how long "no personalised model for this avatar" is remembered
PROBE_TICK_S = 0.05  # the readiness check's deadline is counted in steps of this
PROBE_BACKSTOP_S = 10.0  # the readiness RPCs' own gRPC deadline (never the one that fires first)
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    # Reconnect to a returning Triton within a second, not after gRPC's backoff (up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def parameters(config: dict) -> dict[str, str]:
    """A model config's string parameters (the talkinghead.* metadata)."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def merges_queued_calls(config: dict) -> bool:
    """Whether Triton's dynamic batcher may run several of the calls queued for a model's CPU
    instances as one execution: every instance on the CPU, more than one, and no preferred batch
    of 1 (repositories exported before 2026-12-05). Merged, two one-frame calls both take two
    frames' time, which the cost model reads as a slower generator: admission then holds fewer
    live streams than fit (BENCHMARKS.md)."""
    lanes, gpu = instances(config)
    batching = config.get("dynamic_batching")
    if gpu or lanes < 2 or batching is None:
        return False
    return [int(size) for size in batching.get("preferred_batch_size") or []] != [1]


def _warn_if_merging(model: str, config: dict) -> None:
    if merges_queued_calls(config):
        log.warning(
            "Triton's %s config lets its dynamic batcher merge calls queued for its CPU instances "
            "(no preferred_batch_size [1]): merged calls read as a slower generator and admission "
            "holds fewer live streams than fit; export it again (talkinghead export, or personalise "
            "the avatar again)",
            model,
        )


class NotLoaded(BackendUnavailable):
    """Triton has no such model, or not the version the call named, ready (NOT_FOUND; UNAVAILABLE
    "Request for unknown model ... is not at ready state" for a version it let go of): the model
    was unloaded, not the server lost."""


def _not_loaded(error: InferenceServerException) -> bool:
    status = str(error.status() or "")
    if "NOT_FOUND" in status:
        return True
    return "UNAVAILABLE" in status and (error.message() or "").startswith("Request for unknown model")


class Pinned(NamedTuple):
    """A personalised generator as this replica checked it on one Triton: the version its calls
    name, and that version's Meta.AVATAR_CREATED stamp (None: none)."""

    version: int
    stamp: str | None


def _triton_priority(priority: int) -> int:
    """A call's priority in Triton's queue (contract.TRITON_PRIORITY_*) from the batcher's."""
    return TRITON_PRIORITY_LIVE if priority == LIVE else TRITON_PRIORITY_OFFLINE


class TritonBackend(ReadyGate):
    name = "triton"
    remote_inference = True  # another process, normally on a GPU

    def __init__(
        self,
        *,
        url: str,
        poll_s: float = 0.25,
        ready_timeout_s: float = 1.0,
        timeout_s: float = 5.0,
        stall_s: float = 1.5,
        load_timeout_s: float = TRITON_LOAD_TIMEOUT_S,
        max_personalised: int = MAX_PERSONALISED,
        personalised_idle_s: float = PERSONALISED_IDLE_S,
    ) -> None:
        if max_personalised < 1:
            raise ValueError(f"max_personalised must be >= 1, got {max_personalised}")
        self.url = url
        self.max_personalised, self.personalised_idle_s = max_personalised, personalised_idle_s
        self._in_flight = InFlight()  # personalised calls
        self.poll_s = poll_s
        self.ready_timeout_s = ready_timeout_s
        self.load_timeout_s = load_timeout_s
        self._client: triton.InferenceServerClient | None = None
        self._info: ModelInfo | None = None
        self.init_gate(timeout_s=timeout_s, stall_s=stall_s)
        self._monitor: asyncio.Task[None] | None = None
        # generators this replica loaded or found loaded -> the version its calls name, and its stamp
        self._personalised: dict[str, Pinned] = {}
        self._lookups: set[asyncio.Future[tuple[set[str], dict, int] | None]] = set()  # _pin's
        self._absent_since: dict[str, float] = {}
        self._lanes = 1  # the generator's instances, read from its config once loaded
        self.loads = 0
        self.batches_cheaper = True  # until the config says its instances are all on CPU

    async def start(self) -> None:
        self._client = triton.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        self._monitor = asyncio.create_task(self._watch(), name="triton-monitor")

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
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
        """Whether Triton can run our models: before they are loaded whether it answers (then
        `_load_base` loads them), after that the base models, not the server: Triton reports
        itself not ready while it loads or unloads any model (a new personalised generator), and
        with strict readiness for good once one failed to load, though the loaded ones serve on.
        (The RPCs' own deadline is only a backstop: `_answered` times the check.)"""
        timeout = PROBE_BACKSTOP_S
        if not self._ready.is_set():  # not is_server_ready: false for good after a refused load
            return bool(await self.client.is_server_live(client_timeout=timeout))
        for model in (EMBEDDER, GENERATOR):
            if not await self.client.is_model_ready(model, client_timeout=timeout):
                return False
        return True

    async def _watch(self) -> None:
        while True:
            try:
                up = await self._answered(self._serving())
                if up and not self._ready.is_set():
                    await self._load_base()
                elif not up:
                    self._lost("server not ready")
            except TimeoutError:
                self._lost(f"no answer to the readiness check within {self.ready_timeout_s:g} s")
            except (InferenceServerException, BackendUnavailable, OSError) as error:
                self._lost(str(error))
            await asyncio.sleep(self.poll_s)

    async def _answered(self, check: Awaitable[bool]) -> bool:
        """`check`'s answer; TimeoutError when Triton has not answered within ready_timeout_s of
        time this process was listening. Stretches when the event loop itself was held up (a
        library holding the GIL in a thread: dlib loads its models for ~0.6 s on first use) do
        not count against Triton, or such a pause would fail every call in flight."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(check)
        waited = 0.0
        try:
            while waited < self.ready_timeout_s:
                step = min(PROBE_TICK_S, self.ready_timeout_s - waited)
                started = loop.time()
                done, _ = await asyncio.wait([task], timeout=step)
                if done:
                    return task.result()
                waited += min(step, loop.time() - started)  # a late wake-up counts as `step` only
            raise TimeoutError
        finally:
            if not task.done():
                task.cancel()

    def _lost(self, why: str) -> None:
        if self._ready.is_set():
            log.error("Triton at %s went away: %s", self.url, why)
        self._ready.clear()
        self._personalised.clear()
        self.abandon_calls(f"Triton at {self.url} went away ({why})")
        for lookup in list(self._lookups):
            lookup.cancel()

    async def _config(self, model: str) -> dict:
        answer = await self.client.get_model_config(model, as_json=True, client_timeout=self.load_timeout_s)
        return answer["config"]

    async def _parameters(self, model: str) -> dict[str, str]:
        return parameters(await self._config(model))

    async def _load_base(self) -> None:
        for model in (EMBEDDER, GENERATOR):
            if not await self.client.is_model_ready(model, client_timeout=self.load_timeout_s):
                await self.client.load_model(model, client_timeout=self.load_timeout_s)
        generator = await self._config(GENERATOR)
        self._info = ModelInfo.from_metadata(parameters(generator), where=f"{self.url}/{GENERATOR}")
        self._lanes, self.batches_cheaper = instances(generator)
        _warn_if_merging(GENERATOR, generator)
        embedder_id = (await self._parameters(EMBEDDER)).get(Meta.MODEL_ID)
        if embedder_id != self._info.model_id:
            raise BackendUnavailable(f"{self.url}: embedder and generator come from different models")
        self.loads += 1
        self._ready.set()
        log.info("Triton at %s ready: %s; generator in %d instance(s)", self.url, self._info, self._lanes)

    async def _infer(
        self,
        model: str,
        feeds: dict[str, np.ndarray],
        outputs: list[str],
        priority: int = 0,
        version: int | None = None,
    ) -> list[np.ndarray]:
        """One Triton call; `priority` (contract.TRITON_PRIORITY_*, 0: the model's default) orders it
        in the model's queue; `version` (None: the one Triton serves) pins the model's version.
        NotLoaded when Triton has no such model (version) ready."""
        if not self.loaded():
            raise BackendUnavailable(f"Triton at {self.url} is not ready")
        inputs = []
        for name, array in feeds.items():
            tensor = triton.InferInput(
                name, list(array.shape), "UINT8" if array.dtype == np.uint8 else "FP32"
            )
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(tensor)
        requested = [triton.InferRequestedOutput(name) for name in outputs]
        # The deadline travels with the request too (Triton may drop it); a little later, so that
        # the backend's own deadline answers first.
        infer = self.client.infer(
            model,
            inputs,
            model_version="" if version is None else str(version),
            outputs=requested,
            client_timeout=self.timeout_s + 1,
            priority=priority,
        )
        try:
            result = await self.call(f"Triton {model}", infer)
        except InferenceServerException as error:
            if _not_loaded(error):
                raise NotLoaded(f"Triton {model}: {error.message()}", reason="it failed the call") from error
            gone = "UNAVAILABLE" in str(error.status() or "")  # the connection broke: Triton is gone
            if gone:
                self._lost(str(error))
            reason = "it went away" if gone else "it failed the call"
            raise BackendUnavailable(f"Triton {model}: {error.message()}", reason=reason) from error
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
        self,
        landmark_images: np.ndarray,
        adain: np.ndarray,
        warped: np.ndarray | None = None,
        *,
        priority: int = OFFLINE,
    ) -> np.ndarray:
        feeds = generator_feeds(self.info, landmark_images, adain, warped)
        (image,) = await self._infer(GENERATOR, feeds, [IMAGE], _triton_priority(priority))
        return image

    async def has_personalised(self, avatar_id: str, made_for: str = "") -> bool:
        """Load `generator_<id>` on first use; a missing one is remembered for NEGATIVE_CACHE_S."""
        pinned = await self.pin(avatar_id)
        return pinned is not None and made_for_record(pinned.stamp, made_for)

    async def pin(self, avatar_id: str, at_least: int = 0) -> Pinned | None:
        """`generator_<id>` as this replica's calls name it: the version ready on Triton when it was
        first looked up (loaded if none was, or none of `at_least` or newer). None: no such model,
        another base model's, refused, or Triton went away."""
        name = personalised_name(avatar_id)
        pinned = self._personalised.get(name)
        if pinned is not None and pinned.version >= at_least:
            return pinned
        if time.monotonic() - self._absent_since.get(name, -1e9) < NEGATIVE_CACHE_S or not self.loaded():
            return None
        # Abandoned when Triton is lost (_lost), as model calls are: a frozen Triton held a stream
        # opening (or a call reloading its generator) for load_timeout_s, with health NOT_SERVING.
        lookup = asyncio.ensure_future(self._look_up(name, at_least))
        self._lookups.add(lookup)
        try:
            found = await lookup
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return None  # Triton went away meanwhile
        finally:
            self._lookups.discard(lookup)
        if found is None:
            return None
        ready, config, version = found
        if parameters(config).get(Meta.MODEL_ID) != self.info.model_id:
            log.warning("%s was fine-tuned from another base model; using the shared generator", name)
            return None
        _warn_if_merging(name, config)
        pinned = self._personalised[name] = Pinned(version, parameters(config).get(Meta.AVATAR_CREATED))
        await self._unload_idle(ready | {name}, keep=name)
        return pinned

    async def _look_up(self, name: str, at_least: int = 0) -> tuple[set[str], dict, int] | None:
        """(the personalised generators ready, `name`'s config, its version ready) once `name` is
        loaded (again where the version ready is older than `at_least`); None when the repository
        has no such model (remembered) or Triton refuses it."""
        timeout = self.load_timeout_s
        try:
            index = await self.client.get_model_repository_index(as_json=True, client_timeout=timeout)
            models = index.get("models", [])
            if name not in {m.get("name") for m in models}:
                self._absent_since[name] = time.monotonic()
                return None
            ready = ready_personalised(index)
            versions = [
                int(m["version"])
                for m in models
                if m.get("name") == name and m.get("state") == "READY" and str(m.get("version", "")).isdigit()
            ]
            if not versions or max(versions) < at_least:
                await self.client.load_model(name, client_timeout=timeout)  # else the worker did
            # The config (its stamp) of the version ready before and after it was read: a newer
            # one loaded meanwhile brings its own config.
            for _ in range(3):
                version = await self._ready_version(name)
                config = await self._config(name)
                if await self._ready_version(name) == version:
                    return ready, config, version
            log.error("cannot load %s on Triton: its version kept changing", name)
            return None
        except InferenceServerException as error:
            log.error("cannot load %s on Triton: %s", name, error)
            return None

    async def _ready_version(self, name: str) -> int:
        """The newest version of `name` Triton has ready (InferenceServerException if none)."""
        meta = await self.client.get_model_metadata(name, as_json=True, client_timeout=self.load_timeout_s)
        versions = [int(v) for v in meta.get("versions", []) if str(v).isdigit()]
        if not versions:
            raise InferenceServerException(f"{name} has no version ready", status="StatusCode.NOT_FOUND")
        return max(versions)

    async def _unload_idle(self, ready: set[str], *, keep: str) -> None:
        """Beyond max_personalised personalised generators `ready` on Triton, unload those no replica
        has called for personalised_idle_s (Triton's last inference), least recently called first;
        never `keep` (just loaded) nor one this replica has a call of in flight."""
        excess = len(ready) - self.max_personalised
        if excess <= 0:
            return
        timeout = self.load_timeout_s
        try:
            stats = await self.client.get_inference_statistics(as_json=True, client_timeout=timeout)
        except InferenceServerException as error:
            log.warning("cannot count the personalised generators loaded on Triton: %s", error)
            return
        idle = idle_personalised(
            ready, last_inference(stats), keep=keep, idle_s=self.personalised_idle_s, now=time.time()
        )
        for name, seconds in idle:
            if excess <= 0:
                break
            if name in self._in_flight:
                continue
            try:
                await self.client.unload_model(name, client_timeout=timeout)
            except InferenceServerException as error:
                log.warning("cannot unload %s on Triton: %s", name, error)
                continue
            self._personalised.pop(name, None)
            excess -= 1
            log.info("unloaded personalised generator %s on Triton (no call for %.0f s)", name, seconds)
        if excess > 0:
            log.warning(
                "%d personalised generators loaded on Triton, above the limit of %d: the others were "
                "called in the last %.0f s",
                self.max_personalised + excess,
                self.max_personalised,
                self.personalised_idle_s,
            )

    def lanes(self, avatar_id: str = "") -> int:
        """The shared generator's instances on Triton (personalised generators are written from
        the same profile): the batcher keeps a call in flight per instance, and pipelines drawing
        the next batch with them."""
        return self._lanes

    def loaded_personalised(self) -> int:
        """Personalised generators this replica had Triton load (or found loaded) and uses."""
        return len(self._personalised)

    def personalised_names(self) -> set[str]:
        return set(self._personalised)

    def pinned(self, avatar_id: str) -> Pinned | None:
        """`generator_<avatar_id>` as this replica's calls name it here, without asking Triton (`pin`
        asks, and loads)."""
        return self._personalised.get(personalised_name(avatar_id))

    def knows_personalised(self, avatar_id: str, made_for: str = "") -> bool:
        """Whether this Triton has `generator_<avatar_id>` loaded for `made_for`, as far as this
        replica knows, without asking it (has_personalised asks, and loads)."""
        pinned = self.pinned(avatar_id)
        return pinned is not None and made_for_record(pinned.stamp, made_for)

    def in_flight(self) -> int:
        """Model calls in flight on this Triton now."""
        return len(self._calls)

    def forget_personalised(self, avatar_id: str) -> None:
        name = personalised_name(avatar_id)
        self._personalised.pop(name, None)
        self._absent_since.pop(name, None)

    def forget_all_personalised(self) -> None:
        self._personalised.clear()
        self._absent_since.clear()

    async def generate_personalised(
        self,
        avatar_id: str,
        landmark_images: np.ndarray,
        warped: np.ndarray | None = None,
        *,
        priority: int = OFFLINE,
        made_for: str = "",
    ) -> np.ndarray:
        feeds = generator_feeds(self.info, landmark_images, None, warped)
        # Only the generator fine-tuned on the stream's record (`made_for`): after an avatar event
        # dropped what was known of it (a new version published), or Triton let go of the version
        # pinned, Triton's config is read again, and one made for the record that replaced it
        # under the same id is refused.
        version = await self.checked_version(avatar_id, made_for)
        try:
            return await self.run_personalised(avatar_id, version, feeds, priority)
        except NotLoaded:
            # Triton let go of it since (a newer version loaded, or another replica made room):
            # what it serves now - loaded again where needed - once.
            return await self.run_personalised(
                avatar_id, await self.checked_version(avatar_id, made_for), feeds, priority
            )

    async def checked_version(self, avatar_id: str, made_for: str, at_least: int = 0) -> int:
        """The version of `generator_<avatar_id>` calls for the record `made_for` name here;
        BackendUnavailable (`withdrawn` where Triton answers) when there is none for that record."""
        pinned = await self.pin(avatar_id, at_least)
        if pinned is None or not made_for_record(pinned.stamp, made_for):
            if not self.loaded():
                raise BackendUnavailable(f"Triton at {self.url} is not ready")
            raise withdrawn(personalised_name(avatar_id))
        return pinned.version

    async def run_personalised(
        self, avatar_id: str, version: int, feeds: dict[str, np.ndarray], priority: int = OFFLINE
    ) -> np.ndarray:
        """`generator_<avatar_id>` version `version` on `feeds` (generator_feeds). NotLoaded when
        Triton no longer has that version ready: it is then forgotten here (the next `pin` looks
        again)."""
        name = personalised_name(avatar_id)
        with self._in_flight.call(name):
            try:
                (image,) = await self._infer(name, feeds, [IMAGE], _triton_priority(priority), version)
            except NotLoaded:
                if (pinned := self._personalised.get(name)) is not None and pinned.version == version:
                    del self._personalised[name]
                raise
        return image
