"""The service's state and plain async operations; the gRPC servicers (service/servicer.py) are thin.

App owns the backend, the avatar store and its cache, the batcher, the metrics, the
personalisation operations (service/personalisation.py) and two worker pools: `detect` (image
decoding + dlib landmarks; one thread, dlib's models are shared), which callers reach through a
FairExecutor (service/fair.py: each caller's photos and driving frames queue on their own, callers
take turns), and `io` (store reads and writes).
Its operations: avatars (create, get, list, delete, personalise) and `open_stream`, the one door of
every Animate stream (admission and stream counters live there). `on_event` applies avatar events
(jobs.events) from other replicas and the worker: cached records and personalised models are
forgotten there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from api.talkinghead.v1 import animation_pb2, avatar_pb2
from facekit import warp
from facekit.contract import ModelInfo, avatar_stamp
from facekit.crop import CropBox
from facekit.detect import Bounded, LandmarkDetector, make_detector
from facekit.ids import scoped_id, shown, split_id, validate_avatar_id
from facekit.pasteback import Portrait
from facekit.rasterize import draw_landmarks
from facekit.watermark import Watermarker, payload_for
from facekit.watermark import embed as marking
from jobs import events
from jobs.events import Event
from jobs.record import Job, new_id
from service import avatars, consent
from service.audit import AuditEvent, AuditLog, Intent
from service.auth import Authenticator, Principal
from service.backends.base import Backend, BackendUnavailable, Withdrawn
from service.batcher import SHARED, Batcher, personalised_key
from service.capacity import HEADROOM, Admission, CostModel
from service.errors import (
    CorruptRecord,
    ServiceError,
    aborted,
    backend_unavailable,
    exhausted,
    exists,
    invalid,
    not_found,
    precondition,
    unavailable,
)
from service.fair import FairExecutor
from service.images import decode_image, decode_stored
from service.metrics import LIVE, OFFLINE, Metrics
from service.personalisation import Personaliser
from service.quota import TenantLimits, held
from service.settings import Settings
from service.store import AvatarCache, AvatarRecord, AvatarStore
from service.stream import (
    DrivingLandmarks,
    OpenStreams,
    Stream,
    StreamSetup,
    Watch,
    check_config,
    driving_mapper,
    smoother,
    warp_one,
)
from service.wire import full

log = logging.getLogger("talkinghead.service")
T = TypeVar("T")
DEFAULT_PAGE, MAX_PAGE = 100, 1000
CALIBRATION_ROUNDS = 8  # per batch size, the fastest kept (App._calibrate)
CALIBRATION_GAP_S = 0.1  # between rounds: start-up work of up to ~1 s leaves a round clean
# Photos and driving frames are searched for faces at most this size (longer side): a 39 Mpx photo
# held the shared detect thread 7 s at full size (facekit.detect.Bounded).
DETECT_MAX_SIDE = 1024
# What a delete or replace removes of the avatar before it (the audit log's tombstone says so).
REMOVED = ("photos", "face crops", "psi and embedding", "cached parameters", "personalised generator")
# why a personalisation of an avatar being deleted or replaced ends CANCELLED (its operation's error)
DELETED, REPLACED = "the avatar was deleted", "the avatar was replaced"
# A create's, replace's or delete's audit event is written ahead (service/audit.py Intent); one its server
# did not settle - it died between the change and the event - is recovered once this old (one
# younger may be another replica's change in flight), looked for at start and this often.
PENDING_GRACE_S = 30.0
CHECK_RETRY_S = (1.0, 5.0)  # after missed events, a failed store check of a stream's avatar: again
RECOVERY_INTERVAL_S = 60.0
UNREADABLE_STAMP = "unreadable"  # (the recovery's stamp for a record that cannot be read)
# a stream refused at max_streams is told to retry after this (`retry-after`), as the tenant's quota
# and admission's refusals are
STREAMS_FULL_RETRY_S = 5.0


def actor_of(principal: Principal, peer: str) -> str:
    """Who calls, as the audit log names them: tenant, role, credential and the caller's address."""
    return f"{principal.describe()} peer={peer}"


def public_id(record: AvatarRecord) -> str:
    """The id the avatar's tenant knows it by (records keep the tenant-scoped stored id)."""
    return split_id(record.avatar_id)[1]


def check_id(avatar_id: str) -> str:
    try:
        return validate_avatar_id(avatar_id)
    except ValueError as error:
        raise invalid(str(error)) from error


class App:
    def __init__(
        self,
        *,
        settings: Settings,
        backend: Backend,
        store: AvatarStore,
        metrics: Metrics,
        personaliser: Personaliser,
        audit: AuditLog,
        watermarker: Watermarker,
        auth: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth or Authenticator(store=None, client_certs=False)
        self.backend = backend
        self.store = store
        self.metrics = metrics
        self.personaliser = personaliser
        self.audit = audit
        self.watermarker = watermarker  # every frame sent carries its mark (App._marker)
        # Whether the avatar events that keep the cache right are heard now (service/events.py:
        # the server sets it to the Redis subscription's state; without Redis every change is
        # this process's own or the local worker's, and the cache is always trusted).
        self.events_live: Callable[[], bool] = lambda: True
        self.cache = AvatarCache(
            max_bytes=settings.cache_bytes, on_change=metrics.on_cache, trusted=lambda: self.events_live()
        )
        metrics.personalised_loaded.set_function(backend.loaded_personalised)
        self.detect_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detect")
        # callers take turns on it, one photo or driving frame at a time (service/fair.py)
        self.detect = FairExecutor(pool=self.detect_pool, max_queued=settings.max_detect_queue)
        self.io_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store")
        self._detector: LandmarkDetector | None = None
        # tenant -> CreateAvatar calls in flight (create_slot); of those, new avatars (_avatar_slot)
        self._new_avatars: collections.Counter[str] = collections.Counter()
        self._submitting: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        budget = settings.latency_budget_ms / 1000.0
        self.cost = CostModel()
        self.batcher = Batcher(
            backend=backend,
            max_batch=settings.max_batch,
            on_batch=self._on_batch,
            on_drop=metrics.on_drop,
            on_error=lambda error: self._on_backend_error("generate", error),
            cost=self.cost,
            budget=budget,
        )
        self.admission = Admission(
            cost=self.cost, budget=budget, max_batch=settings.max_batch, enabled=settings.admission
        )
        self.active_streams = 0
        self.streams = OpenStreams()  # by avatar: a delete or replace ends them (_avatar_changed)
        self._checks: set[asyncio.Task[None]] = set()  # _check_streams in flight
        # streams follow the tenant's quotas as the key ring says now, not those they opened with
        self.limits = TenantLimits(
            metrics,
            quotas_of=self.auth.quotas,
            max_creates=settings.max_creates,
            max_creates_per_tenant=settings.max_creates_per_tenant,
            ring_of=lambda: self.auth.ring,
        )
        self._calibration: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None

    def _warm_up(self) -> None:
        warp.warm_up()
        marking.warm_up()

    async def start(self) -> None:
        # The warp's and the mark's compiled loops are compiled (6-12 s and ~5 s cold) or loaded
        # from numba's cache beside the backend's start, not on the first frame.
        await asyncio.gather(asyncio.to_thread(self._warm_up), self.backend.start())
        self.batcher.start()
        self._calibration = asyncio.create_task(self._follow_backend(), name="calibrate")
        self._recovery = asyncio.create_task(self._recover_audit_often(), name="audit-recovery")

    async def _follow_backend(self) -> None:
        """Calibrate once the backend is ready, and again each time it has loaded its models anew:
        a Triton restarted with the generator in another instance count, or rescheduled onto other
        hardware, has other lanes and another cost, and capacity from the old one would admit
        streams it cannot serve (2 lanes' worth into 1) or keep one-frame calls on a GPU.
        Between calibrations the capacity gauge is published every second: the calls streams
        make keep teaching the cost model, and a scrape should read what admission holds now,
        not what it held when a stream last began or ended."""
        seen = 0
        while True:
            loads = self.backend.loads
            if loads != seen and self.backend.is_ready():
                if seen:
                    log.info("the backend loaded its models anew: measuring the generator's cost again")
                seen = loads
                await self._calibrate()
            elif seen and self.cost.observations:
                self.cost.settle()  # idle sizes drift back to their calibration
                self._publish_capacity()
            self.limits.prune()  # tenants the key ring dropped lose their series
            await asyncio.sleep(0.25 if not seen else 1.0)

    async def _calibrate(self) -> None:
        """Measure the generator's cost, so admission starts from this backend's figures, not a
        guess (nor the figures of the server it had before): at batch 1 and 4, CALIBRATION_ROUNDS
        rounds CALIBRATION_GAP_S apart, each of one call per lane at once (each call timed as it
        runs beside the others) made twice, the second timed; the fastest round is kept, and the
        cost model is seeded from the fastest so far after every round, so admission has a
        figure ~60 ms after the backend is ready. A round that meets other work (an avatar being
        made as the server starts) reads the generator slower than it is: with three rounds back
        to back (0.1 s), an avatar made beside them put capacity at 43-53 frames/s against 63-73
        alone (2026-12-05, AMD EPYC, openvino-bf16 in 2 lanes); spread over ~1.2 s, the same either
        way (71.6-72.7), 4 starts each. Work that lasts the whole calibration still lowers it, and the
        batches streams run then correct it (~30 batches).

        With TALKINGHEAD_BATCHING=auto and a generator that runs calls side by side in lanes on
        the CPU (the in-process engines, Triton's CPU instances), every call is one frame: the
        lanes keep the cores busy without batches, and on the 2-core bench VM no engine ran
        cheaper per frame in batches
        (openvino-bf16 129 frames/s at batch 1, 123-125 at 2-16; onnxruntime 4 % dearer at 4;
        openvino fp32 within 2 %), while batches of up to 4 took ~3 % off live + offline
        throughput and raised live p99 from ~65 to ~115 ms. A backend that runs one call at a
        time, or where batches cost less per frame (a GPU), keeps batching."""
        self.admission.lanes = lanes = self.batcher.lanes(SHARED)
        one_frame = (
            self.settings.batching == "auto"
            and lanes > 1
            and not self.backend.batches_cheaper
            and self.settings.max_batch > 1
        )
        self.batcher.batch_cap = self.admission.max_batch = 1 if one_frame else self.settings.max_batch
        if one_frame:
            log.info("one frame per generator call: the engine runs %d calls side by side", lanes)
        try:
            info = self.backend.info
            s = info.image_size
            sizes = sorted({1, min(4, self.batcher.batch_cap)})
            rounds: dict[int, list[list[float]]] = {batch: [] for batch in sizes}
            for round_ in range(CALIBRATION_ROUNDS):
                if round_:
                    await asyncio.sleep(CALIBRATION_GAP_S)
                for batch in sizes:  # the sizes take turns: what disturbs one round does not favour a size
                    images = np.zeros((batch, s, s, 3), np.uint8)
                    adain = np.zeros((batch, info.adain_size), np.float32)
                    warped = images if info.warp_guided else None
                    for _ in range(2):  # the first wakes the engine's threads after the gap
                        calls = [self._timed_call(images, adain, warped) for _ in range(lanes)]
                        taken = await asyncio.gather(*calls)
                    rounds[batch].append(taken)
                self._seed(rounds)  # admission has a figure after the first round, a better one after each
        except Exception as error:  # the batches streams run will teach the model instead
            log.warning("could not calibrate the generator's cost: %s", error)
            return
        log.info(
            "generator cost %.1f ms + %.1f ms/frame: live capacity %.0f frames/s at batch <= %d "
            "in %d lane(s) (budget %d ms)",
            self.cost.fixed * 1e3,
            self.cost.per_frame * 1e3,
            self.admission.capacity,
            self.admission.batch_limit(),
            self.admission.lanes,
            self.settings.latency_budget_ms,
        )
        if self.admission.committed > HEADROOM * self.admission.capacity:
            log.warning(
                "the live streams admitted before reserve %.0f frames/s, more than the %.0f this "
                "backend can take: no live stream is admitted until enough of them end",
                self.admission.committed,
                HEADROOM * self.admission.capacity,
            )
        self._publish_capacity()

    def _seed(self, rounds: dict[int, list[list[float]]]) -> None:
        """The cost model from the fastest round of each batch size so far, and nothing else: what
        batches taught it before was about the backend it had before, or about this one's start."""
        self.cost.reset()
        for batch, taken in rounds.items():
            fastest = min(taken, key=sum)  # (one call per lane)
            self.cost.calibrate(batch, sum(fastest) / len(fastest))

    async def _timed_call(self, images: np.ndarray, adain: np.ndarray, warped: np.ndarray | None) -> float:
        t0 = time.perf_counter()
        await self.backend.generate(images, adain, warped)
        return time.perf_counter() - t0

    def _publish_capacity(self) -> None:
        self.metrics.capacity_fps.set(self.admission.capacity)
        self.metrics.committed_fps.set(self.admission.committed)

    async def close(self) -> None:
        """Stop the background tasks (and wait for them), the batcher, the backend and the pools."""
        tasks = [t for t in (self._calibration, self._recovery, *self._checks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.batcher.close()
        await self.backend.close()
        self.personaliser.close()
        self.detect.close()
        self.detect_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=False, cancel_futures=True)

    # -- helpers ------------------------------------------------------------------------------
    def _on_batch(self, model: str, size: int, seconds: float) -> None:
        self.metrics.batch_sizes["shared" if model == "" else "personalised"].observe(size)
        self.metrics.stage["inference"].observe(seconds)

    def _on_backend_error(self, operation: str, error: BaseException) -> None:
        if isinstance(error, Withdrawn):
            # the avatar was replaced or deleted (or its generator withdrawn) under a stream: its
            # streams end, the backend did nothing wrong (counted, it tripped backend alerts)
            log.info("a stream's personalised generator was withdrawn: %s", error)
            return
        kind = "unavailable" if isinstance(error, BackendUnavailable) else "error"
        self.metrics.backend_errors.labels(operation, kind).inc()
        log.warning("backend %s failed: %s", operation, error)

    async def in_pool(self, pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @property
    def detector(self) -> LandmarkDetector:
        """The landmark detector (built on first use; call from the detect pool)."""
        if self._detector is None:
            self._detector = Bounded(make_detector(self.settings.detector), max_side=DETECT_MAX_SIDE)
        return self._detector

    def info(self) -> ModelInfo:
        try:
            return self.backend.info
        except BackendUnavailable as error:
            raise backend_unavailable(error.reason) from error

    # -- avatars ------------------------------------------------------------------------------
    async def record_event(self, event: str, record: AvatarRecord, *, actor: str, **detail: Any) -> None:
        """Append to the audit log; a failure to write is logged loudly, never turned into a
        failed call after the change it records has happened."""
        await self._append(audit_event(event, record, actor=actor, **detail))

    async def _append(self, entry: AuditEvent) -> bool:
        """Append one event (whether it was written: a failure is logged and counted)."""
        try:
            await self.in_pool(self.io_pool, self.audit.append, entry)
        except Exception as error:
            self.metrics.audit_failures.inc()
            log.error("could not write the audit event %s of %s: %s", entry.event, entry.avatar_id, error)
            return False
        return True

    async def _intend(self, entry: AuditEvent, *, gone: float = 0.0, made: float = 0.0) -> Intent:
        """Write `entry` ahead of the change it records (service/audit.py): if this process dies
        between the change and its event, App.recover_audit appends it. When the intent cannot be
        written (counted as a failed audit write) the change is refused, UNAVAILABLE: it went on,
        and a create or a delete the log could not take was left with no event ever (helper-81)."""
        intent = Intent(key=new_id(), event=entry, gone=gone, made=made)
        try:
            await self.in_pool(self.io_pool, self.audit.intend, intent)
        except Exception as error:
            self.metrics.audit_failures.inc()
            log.error(
                "could not write ahead the audit event %s of %s: %s", entry.event, entry.avatar_id, error
            )
            why = "its storage is full" if full(error) else "its storage is unreachable or failed"
            raise unavailable(
                f"the audit log cannot be written ({why}); nothing was changed; retry later"
            ) from None
        return intent

    async def _settle(self, intent: Intent | None) -> None:
        if intent is None:
            return
        try:
            await self.in_pool(self.io_pool, self.audit.settle, intent.key)
        except Exception as error:  # the recovery appends it once more: twice is better than never
            log.error("could not settle the audit intent %s: %s", intent.key, error)

    async def _commit(self, intent: Intent | None, entry: AuditEvent) -> None:
        """Append the event written ahead, then settle its intent (kept for the recovery when the
        append failed)."""
        if await self._append(entry):
            await self._settle(intent)

    async def recover_audit(self, *, older_than: float | None = None) -> int:
        """Append the events of creates, replaces and deletes whose server died between the
        change and its event (their intents, older than `older_than` s, default
        PENDING_GRACE_S), marked `detail.recovered`; drop the intents of changes that did not
        happen (the store still holds the record a delete was to remove, or not the record a
        create or replace was to write). How many events were appended."""
        grace = PENDING_GRACE_S if older_than is None else older_than
        appended = 0
        for intent in await self.in_pool(self.io_pool, self.audit.intents):
            if time.time() - intent.written < grace:
                continue
            entry = intent.event
            try:
                record = await self.in_pool(self.io_pool, self.store.get, entry.avatar_id)
                now = None if record is None else avatar_stamp(record.create_time)
            except CorruptRecord:  # neither a create's record nor gone: not happened
                now = UNREADABLE_STAMP
            # a replace happened when the store holds its new record, a delete when not its old one
            # (an unreadable record's delete: when none is there)
            if intent.made:
                happened = now == avatar_stamp(intent.made)
            else:
                happened = (
                    now is None
                    if not intent.gone
                    else now not in (avatar_stamp(intent.gone), UNREADABLE_STAMP)
                )
            if happened:
                recovered = dataclasses.replace(entry, detail={**entry.detail, "recovered": True})
                if not await self._append(recovered):
                    continue
                appended += 1
                log.warning(
                    "audit: appended the %s event of %s that its server did not write (it stopped "
                    "between the change and its event)",
                    entry.event,
                    entry.avatar_id,
                )
            else:
                log.info(
                    "audit: the %s of %s did not happen; its intent is dropped", entry.event, entry.avatar_id
                )
            await self._settle(intent)
        return appended

    async def _recover_audit_often(self) -> None:
        while True:
            try:
                await self.recover_audit()
            except Exception as error:  # the store or the log unreachable: the next round
                log.warning("audit recovery failed: %s: %s", type(error).__name__, error)
            await asyncio.sleep(RECOVERY_INTERVAL_S)

    async def create_avatar(
        self, request: avatar_pb2.CreateAvatarRequest, *, principal: Principal, actor: str
    ) -> AvatarRecord:
        public = check_id(request.avatar_id)
        avatar_id = scoped_id(principal.tenant, public)
        avatars.check_request(request, self.settings.max_images)
        consent_record = consent.check(request.consent, request.HasField("consent"))
        info = self.info()
        self.limits.create(principal)
        try:
            previous = await self.in_pool(self.io_pool, self.store.get, avatar_id)
            unreadable = False
        except CorruptRecord as error:  # a replace writes over it (DATA_LOSS, saying so, without)
            if not request.replace:
                raise
            log.warning(
                "replacing avatar %s, whose stored record cannot be read (%s)", avatar_id, error.detail
            )
            previous, unreadable = None, True
        existed = previous is not None or unreadable
        if existed and not request.replace:
            raise exists(f"avatar {public!r} already exists; delete it or set replace = true")
        async with self._avatar_slot(principal, new=not existed) as counted:
            prepared = await self._prepare(request, info, caller=principal.tenant)
            drawn = avatars.landmark_images(prepared, info)
            try:
                # at most max_batch photos per embedder call, as the generator's batches: a runtime's
                # memory grows with the largest batch it has run (32 photos: +250 MiB with ONNX Runtime)
                step = self.settings.max_batch
                parts = [
                    await self.backend.embed(prepared.crops[i : i + step], drawn[i : i + step])
                    for i in range(0, len(drawn), step)
                ]
                embedding = np.concatenate([part[0] for part in parts])
                adain = np.concatenate([part[1] for part in parts])
            except BackendUnavailable as error:
                self._on_backend_error("embed", error)
                raise backend_unavailable(error.reason) from error
            except Exception as error:  # (INTERNAL for the caller: service/wire.py)
                self._on_backend_error("embed", error)
                raise
            record = avatars.make_record(
                avatar_id, request.display_name, prepared, embedding, adain, info, consent_record
            )
            if counted:  # (creates of other replicas written meanwhile)
                self.limits.avatars(principal, len(await self._tenant_ids(principal.tenant)))
            tombstone: dict[str, Any] = {}  # a replace is the old record's tombstone too
            if existed:
                tombstone["replaced"] = {
                    "consent_id": previous.consent.get("record_id", "") if previous is not None else "",
                    "removed": REMOVED,
                    **({"unreadable": True} if unreadable else {}),
                }
            entry = audit_event(
                "replace" if existed else "create",
                record,
                actor=actor,
                images=len(request.images),
                consent=record.consent,
                **tombstone,
            )
            # As for a delete (delete_avatar): what must outlive a crash first. A replaced
            # avatar's fine-tuned generator shows the old photos' person: its withdrawal is queued
            # before the record is overwritten. The event (a replace's is the old record's
            # tombstone) is written ahead, for the recovery to append if this process dies.
            if existed:  # (an unreadable record's time is not known: every generator of the id)
                await self.personaliser.forget_avatar(avatar_id, previous.create_time if previous else 0.0)
            intent = await self._intend(entry, made=record.create_time)
            stamp = self.cache.stamp()  # a delete of this id that starts while the record is written wins
            if not await self.in_pool(self.io_pool, lambda: self.store.put(record, replace=request.replace)):
                await self._settle(intent)
                raise exists(f"avatar {public!r} already exists; delete it or set replace = true")
            self.cache.put(record, stamp=stamp)
            self._avatar_changed(avatar_id, avatar_stamp(record.create_time))  # streams of a replaced one end
            if existed:
                gone_at = previous.create_time if previous is not None else None
                await self._forget_personalisation(avatar_id, gone_at, reason=REPLACED)
            self.metrics.avatars_created.inc()
            await self._commit(intent, entry)
            log.info("created avatar %s from %d image(s)", avatar_id, len(request.images))
            return record

    @contextlib.asynccontextmanager
    async def _avatar_slot(self, principal: Principal, *, new: bool) -> AsyncIterator[bool]:
        """Hold one of the tenant's max_avatars while a new avatar is made (whether one is
        counted): creates in flight count with the stored avatars (8 creates at once against a
        limit of 2 all passed the count taken before their seconds of face detection)."""
        tenant = principal.tenant
        if not new or not self.limits.quotas(principal).max_avatars:
            yield False
            return
        self.limits.avatars(principal, len(await self._tenant_ids(tenant)) + self._new_avatars[tenant])
        with held(self._new_avatars, tenant):
            yield True

    async def _prepare(
        self, request: avatar_pb2.CreateAvatarRequest, info: ModelInfo, *, caller: str
    ) -> avatars.Prepared:
        """Each photo decoded and its face found and cropped, one photo per turn of `caller` in the
        detect pool (service/fair.py); the first turn checks every photo's header first."""
        parts = []
        for index in range(len(request.images)):
            parts.append(await self.detect.run(caller, self._prepare_one, request, index, info))
        return avatars.combine(parts)

    def _prepare_one(
        self, request: avatar_pb2.CreateAvatarRequest, index: int, info: ModelInfo
    ) -> avatars.PreparedImage:
        """One photo (in the detect pool: the detector is built there on first use)."""
        s = self.settings
        if index == 0:  # nothing is decoded before every header passed the limits
            avatars.probe(
                request.images,
                crop_scale=info.crop_scale,
                size=info.image_size,
                max_bytes=s.max_image_bytes,
                max_pixels=s.max_image_pixels,
                max_request_pixels=s.max_request_pixels,
            )
        return avatars.prepare_one(
            index,
            request.images[index],
            info,
            self.detector,
            max_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels,
            portrait=index == 0,
        )

    async def get_record(self, avatar_id: str, principal: Principal) -> AvatarRecord:
        """The tenant's avatar; NOT_FOUND whether it does not exist or belongs to another tenant."""
        public = check_id(avatar_id)
        avatar_id = scoped_id(principal.tenant, public)
        record = self.cache.get(avatar_id)
        if record is None:
            stamp = self.cache.stamp()
            record = await self.in_pool(self.io_pool, self.store.get, avatar_id)
            if record is None:
                raise not_found(f"no avatar with id {public!r}")
            self.cache.put(record, stamp=stamp)
        return record

    async def _tenant_ids(self, tenant: str) -> list[str]:
        """The tenant's public avatar ids, sorted."""
        ids = await self.in_pool(self.io_pool, self.store.ids)
        return sorted(public for owner, public in map(split_id, ids) if owner == tenant)

    async def list_avatars(
        self, page_size: int, page_token: str, principal: Principal
    ) -> tuple[list[AvatarRecord], str, int]:
        if page_size < 0:
            raise invalid(f"page_size must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        after = decode_token(page_token)
        ids = await self._tenant_ids(principal.tenant)
        later = [i for i in ids if i > after]
        records = []
        for public in later[:size]:  # (the metadata alone: a listing reads no photo)
            try:
                record = await self.in_pool(
                    self.io_pool, self.store.listing, scoped_id(principal.tenant, public)
                )
            except CorruptRecord as error:  # (one damaged record made every listing INTERNAL)
                log.error("listing avatars: %s; left out", error.detail)
                continue
            if record is not None:  # deleted meanwhile
                records.append(record)
        next_token = encode_token(later[size - 1]) if len(later) > size else ""
        return records, next_token, len(ids)

    async def delete_avatar(self, avatar_id: str, *, principal: Principal, actor: str) -> None:
        """Delete the avatar: first what must outlive a crash - the job that withdraws its
        generator (queued: the worker waits for the record to go) and its tombstone, written
        ahead -, then the record, then the tombstone. Before, the record went first: a server
        killed right after left the generator with no job to withdraw it, no tombstone, and a
        second delete answered NOT_FOUND. A queue that cannot take the job fails the delete
        (UNAVAILABLE) with nothing deleted."""
        public = check_id(avatar_id)
        avatar_id = scoped_id(principal.tenant, public)
        self.cache.discard(avatar_id)
        # from the store, not the cache: the tombstone and the job name the record deleted now
        try:
            record = await self.in_pool(self.io_pool, self.store.get, avatar_id)
        except CorruptRecord as error:  # deleted all the same: the way out for its owner
            log.warning(
                "deleting avatar %s, whose stored record cannot be read (%s)", avatar_id, error.detail
            )
            record = None
            tombstone = AuditEvent(
                event="delete",
                avatar_id=avatar_id,
                actor=actor,
                model_id="",
                consent_id="",
                detail={"tombstone": True, "removed": REMOVED, "unreadable": True},
            )
        else:
            if record is None:
                raise not_found(f"no avatar with id {public!r}")
            tombstone = audit_event("delete", record, actor=actor, tombstone=True, removed=REMOVED)
        created = record.create_time if record is not None else None
        await self.personaliser.forget_avatar(avatar_id, created or 0.0)
        intent = await self._intend(tombstone, gone=created or 0.0)
        deleted = await self.in_pool(self.io_pool, self.store.delete, avatar_id)
        # again: a replace whose write the delete waited for cached its record meanwhile
        self.cache.discard(avatar_id)
        if not deleted:  # another call deleted it meanwhile: the tombstone is that call's
            await self._settle(intent)
            raise not_found(f"no avatar with id {public!r}")
        self._avatar_changed(avatar_id, None)  # its streams end now
        await self._forget_personalisation(avatar_id, created, reason=DELETED)
        await self._commit(intent, tombstone)
        log.info("deleted avatar %s", avatar_id)

    async def _forget_personalisation(self, avatar_id: str, created: float | None, *, reason: str) -> None:
        """After the avatar's record made at `created` (None: one that could not be read) was
        deleted or replaced: the backend forgets its generator, and a personalisation of it is
        cancelled. The change has happened: a failure here is logged, not raised (the worker
        stops such a job itself, finding its record gone)."""
        self.backend.forget_personalised(avatar_id)
        try:
            await self.personaliser.cancel_active(avatar_id, reason=reason, created=created)
        except Exception as error:
            log.error("could not cancel the personalisation of %s: %s", avatar_id, error)

    async def personalise(
        self, avatar_id: str, *, principal: Principal, steps: int, preset: str, actor: str
    ) -> Job:
        record = await self.get_record(avatar_id, principal)
        # one tenant's check-then-submit at a time per replica: two at once both saw room
        async with self._submitting[principal.tenant]:
            if self.limits.quotas(principal).max_personalisations:
                self.limits.personalisations(principal, await self.personaliser.active(principal.tenant))
            job = await self.personaliser.start(record, self.info(), steps=steps, preset=preset)
        # A delete or replace that ran while the job was submitted cancelled what was queued before
        # it: this job may hold photos the avatar no longer has. Looked at again, from the store.
        now = await self.in_pool(self.io_pool, self.store.get, record.avatar_id)
        if now is None or now.create_time != record.create_time:
            await self.personaliser.withdraw(job, DELETED if now is None else REPLACED)
            public = split_id(record.avatar_id)[1]
            if now is None:
                raise not_found(f"no avatar with id {public!r}: it was deleted as personalisation started")
            raise aborted(f"avatar {public!r} was replaced as personalisation started; start it again")
        await self.record_event("personalise", record, actor=actor, operation=job.id, steps=job.steps)
        log.info("personalising %s in %d steps: operation %s", avatar_id, job.steps, job.id)
        return job

    def on_event(self, event: Event) -> None:
        """An avatar event from another replica or the worker (jobs.events). `changed` and
        `deleted` mean the record changed: its open streams are checked against the store and
        end if it is gone or another; `personalised` and `unpersonalised` only concern new
        streams (a running one keeps its model; one whose generator was withdrawn ends
        UNAVAILABLE at its next batch)."""
        if event.event in (events.CHANGED, events.DELETED):
            self.cache.discard(event.avatar_id)
            self._check_streams_later(event.avatar_id, event.event)
        if event.event != events.CHANGED:
            self.backend.forget_personalised(event.avatar_id)
        self.metrics.avatar_events.labels(event.event).observe(max(0.0, time.time() - event.sent))

    def on_events_lost(self) -> None:
        """Events may have been missed (the subscription was lost or is new, Redis lost its data,
        events.jsonl was truncated or replaced): trust no cached record nor loaded personalised
        generator (a running stream of one opens it again, checked against its record), and
        check every open stream's record against the store."""
        self.cache.clear()
        self.backend.forget_all_personalised()
        for avatar_id in self.streams.avatars():
            self._check_streams_later(avatar_id, None)

    # -- streams of a changed avatar ----------------------------------------------------------
    def _avatar_changed(self, avatar_id: str, stamp: str | None) -> None:
        """This replica deleted the avatar (`stamp` None) or wrote a new record of it (stamped
        `stamp`): every stream of another record ends; those still reading it read it again."""
        for watch in self.streams.of(avatar_id):
            if watch.stamp is None:
                watch.stale = True
            elif watch.stamp != stamp:
                watch.end(self._changed_error(avatar_id, deleted=stamp is None))

    @staticmethod
    def _changed_error(avatar_id: str, *, deleted: bool) -> ServiceError:
        public = split_id(avatar_id)[1]
        if deleted:
            return not_found(f"avatar {public!r} was deleted")
        return aborted(f"avatar {public!r} was replaced; open a new stream")

    def _check_streams_later(self, avatar_id: str, kind: str | None) -> None:
        watches = self.streams.of(avatar_id)
        if not watches:
            return
        for watch in watches:
            if watch.stamp is None:
                watch.stale = True
        task = asyncio.get_running_loop().create_task(self._check_streams(avatar_id, kind))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check_streams(self, avatar_id: str, kind: str | None) -> None:
        """After an avatar event (`kind`; None: events were missed): the streams of the avatar
        whose record is no longer the stored one end (an event may also be of the record a
        stream opened on: one created as the stream read it). When the store cannot be read,
        the event says what happened; after missed events nothing is known, and the store is
        asked again (1 s, doubling to 5 s) for as long as the avatar has streams: a delete whose
        event was missed while this replica's connections to Redis were half-open left its
        streams rendering the deleted face to their end, the one check having timed out."""
        wait = CHECK_RETRY_S[0]
        while True:
            try:
                record = await self.in_pool(self.io_pool, self.store.get, avatar_id)
                break
            except Exception as error:
                if kind is not None:
                    log.warning(
                        "could not read %s after its %s event (%s): its streams end", avatar_id, kind, error
                    )
                    for watch in self.streams.of(avatar_id):
                        if watch.stamp is not None:
                            watch.end(self._changed_error(avatar_id, deleted=kind == events.DELETED))
                    return
                if not self.streams.of(avatar_id):
                    return
                log.warning(
                    "could not check the streams of %s against the store (%s); again in %.0f s",
                    avatar_id,
                    error,
                    wait,
                )
                await asyncio.sleep(wait)
                wait = min(2 * wait, CHECK_RETRY_S[1])
        now = None if record is None else avatar_stamp(record.create_time)
        for watch in self.streams.of(avatar_id):
            if watch.stamp is not None and watch.stamp != now:
                watch.end(self._changed_error(avatar_id, deleted=now is None))

    async def personalised(self, record: AvatarRecord) -> bool:
        """Whether the avatar's streams get its personalised generator: one fine-tuned on this
        record (a generator left by an avatar deleted or replaced under the same id is not)."""
        try:
            return await self.backend.has_personalised(record.avatar_id, avatar_stamp(record.create_time))
        except BackendUnavailable:
            return False

    # -- streams ------------------------------------------------------------------------------
    async def open_stream(
        self, config: animation_pb2.StreamConfig, *, principal: Principal, actor: str
    ) -> Stream:
        """Admit one Animate stream: config and avatar checked, a stream slot taken
        (RESOURCE_EXHAUSTED at max_streams, or at the tenant's quota), its queue opened in the
        batcher. Stream.close() gives the slots back through `release`."""
        setup = check_config(config)
        info = self.info()
        self._check_stream_room()  # (again as the slot is taken): a full server refuses before any read
        # followed from before its record is read: a delete or replace meanwhile is not missed
        watch = self.streams.watch(scoped_id(principal.tenant, check_id(config.avatar_id)))
        try:
            return await self._open_stream(config, setup, info, watch, principal=principal, actor=actor)
        except BaseException:
            self.streams.forget(watch)
            raise

    async def _open_stream(
        self,
        config: animation_pb2.StreamConfig,
        setup: StreamSetup,
        info: ModelInfo,
        watch: Watch,
        *,
        principal: Principal,
        actor: str,
    ) -> Stream:
        record = await self.get_record(config.avatar_id, principal)
        while watch.stale:  # the avatar changed as it was read: read it again
            watch.stale = False
            record = await self.get_record(config.avatar_id, principal)
        watch.stamp = avatar_stamp(record.create_time)
        avatar_id = record.avatar_id
        if record.model_id != info.model_id:
            raise precondition(
                f"avatar {config.avatar_id!r} was made with model {record.model_id}, the server runs "
                f"{info.model_id}; create the avatar again"
            )
        mapper = driving_mapper(config, info, record.points)
        if info.warp_guided and len(record.crops) == 0:
            raise precondition(f"avatar {config.avatar_id!r} keeps no reference photos; create it again")
        portrait = await self._portrait(record) if setup.config.paste_back else None
        personalised = await self.personalised(record)
        kind = OFFLINE if setup.block else LIVE
        self._take_stream_slot(principal, kind)
        reserved = 0.0
        try:
            if not setup.block:
                reserved = self._admit(setup.fps)
            await self.record_event(
                "animate_start",
                record,
                actor=actor,
                personalised=personalised,
                paste_back=setup.config.paste_back,
            )
        except BaseException:
            # refused, or the caller gone (a cancel lands in the await; no Stream exists yet to
            # close): the slot and the reservation go back uncounted, as if never taken
            self._give_back(principal.tenant, kind, reserved)
            raise
        width, height = portrait.size if portrait is not None else (info.image_size, info.image_size)
        started = animation_pb2.StreamStarted(
            image_size=info.image_size,
            personalised=personalised,
            model_id=info.model_id,
            queue_depth=setup.depth,
            output_width=width,
            output_height=height,
            watermark_key_id=self.watermarker.fingerprint,
            latency_budget_ms=0 if setup.block else self.settings.latency_budget_ms,
        )
        stream = Stream(
            setup=setup,
            adain=None if personalised else record.adain,
            # the generator fine-tuned on this record, never one made for a record replacing it
            model=personalised_key(avatar_id, watch.stamp) if personalised else SHARED,
            mapper=mapper,
            queue=self.batcher.open_stream(depth=setup.depth, block=setup.block),
            started=started,
            draw=functools.partial(draw_landmarks, size=info.image_size, style=info.draw_style),
            warp=functools.partial(warp_one, record.crops, record.crop_points) if info.warp_guided else None,
            portrait=portrait,
            paste_region="crop" if info.warp_guided else "face",
            smoother=smoother(setup.config),
            mark=self._marker(avatar_id),
            find_landmarks=functools.partial(self.driving_landmarks, caller=principal.tenant),
            metrics=self.metrics,
            pace=functools.partial(self.limits.frame, principal),
            release=functools.partial(self._release_stream_slot, principal.tenant, kind, reserved, watch),
            idle_timeout=self.settings.stream_idle_timeout,
        )
        self.streams.attach(watch, stream)
        return stream

    def _marker(self, stored_id: str) -> Callable[[np.ndarray], np.ndarray]:
        """Every frame of the avatar's streams: the mark of payload_for(tenant, avatar)."""
        return functools.partial(self.watermarker.mark, payload=payload_for(*split_id(stored_id)))

    async def _portrait(self, record: AvatarRecord) -> Portrait:
        """The avatar's source photo for paste-back (decoded in the io pool, once per stream), its
        face crop's box marked as the generated crop pasted there is (Stream._finish), so the part
        of the box the crop does not cover (its feather; outside the face hull for region "face")
        carries the same mark: ~20 ms once, a side x side pattern."""
        if not record.portrait_jpeg:
            raise precondition(f"avatar {public_id(record)!r} keeps no source photo; create it again")
        box = CropBox(*record.portrait_box)
        watermarker = self.watermarker

        def load() -> Portrait:
            portrait = Portrait(image=decode_stored(record.portrait_jpeg), box=box)
            payload = payload_for(*split_id(record.avatar_id))
            return Portrait(image=watermarker.mark_box(portrait.image, payload, portrait.origin), box=box)

        found: Portrait = await self.in_pool(self.io_pool, load)
        return found

    def _take_stream_slot(self, principal: Principal, kind: str) -> None:
        """A slot for a stream of `kind` (LIVE or OFFLINE), under the server's and the tenant's limits."""
        self._check_stream_room()
        self.limits.take_stream(principal)
        self.active_streams += 1
        self.metrics.open_streams[kind].inc()

    def _check_stream_room(self) -> None:
        if self.active_streams >= self.settings.max_streams:
            error = exhausted(
                f"the server is at its limit of {self.settings.max_streams} concurrent streams; retry later"
            )
            error.retry_after = STREAMS_FULL_RETRY_S
            raise error

    def _admit(self, fps: float) -> float:
        try:
            reserved = self.admission.admit(fps)
        except ServiceError:
            self.metrics.admission_refusals.inc()
            raise
        self._publish_capacity()
        return reserved

    def _release_stream_slot(self, tenant: str, kind: str, reserved: float, watch: Watch, code: str) -> None:
        # (talkinghead_streams_total counts the call's final status, refused ones too: service/rpc_metrics.py)
        self.streams.forget(watch)
        self._give_back(tenant, kind, reserved)

    def _give_back(self, tenant: str, kind: str, reserved: float) -> None:
        """What _take_stream_slot and _admit took."""
        if reserved:
            self.admission.release(reserved)
            self._publish_capacity()
        self.limits.release_stream(tenant)
        self.active_streams -= 1
        self.metrics.open_streams[kind].dec()

    async def driving_landmarks(self, image: bytes, what: str, *, caller: str) -> DrivingLandmarks:
        """Decode a driving image and find its largest face's landmarks (in the detect pool, in
        `caller`'s turn)."""

        def work() -> DrivingLandmarks:
            t0 = time.perf_counter()
            rgb = decode_image(
                image,
                max_bytes=self.settings.max_image_bytes,
                max_pixels=self.settings.max_image_pixels,
                what=what,
            )
            t1 = time.perf_counter()
            faces = self.detector.detect(rgb)
            return DrivingLandmarks(
                size=(rgb.shape[1], rgb.shape[0]),
                points=faces[0].points if faces else None,
                decode_s=t1 - t0,
                landmarks_s=time.perf_counter() - t1,
            )

        found: DrivingLandmarks = await self.detect.run(caller, work)
        return found


def audit_event(event: str, record: AvatarRecord, *, actor: str, **detail: Any) -> AuditEvent:
    """The audit log's event about `record`."""
    return AuditEvent(
        event=event,
        avatar_id=record.avatar_id,
        actor=actor,
        model_id=record.model_id,
        consent_id=str(record.consent.get("record_id", "")),
        detail=detail,
    )


def encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(b"after:" + last_id.encode()).decode()


def decode_token(token: str) -> str:
    """The id after which the page starts ("" for the first page)."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise invalid(f"malformed page_token {shown(token)}") from None
    if not raw.startswith("after:"):
        raise invalid(f"malformed page_token {shown(token)}")
    return raw[len("after:") :]
