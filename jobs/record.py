"""A personalisation job: its states, the preset -> steps map, progress, and its JSON form.

The service creates a job (QUEUED), a worker takes it (RUNNING, stage fine-tuning -> exporting ->
loading) and ends it (SUCCEEDED, FAILED or CANCELLED). Both sides read and write the same record
through a queue (jobs.queue.JobQueue), so this module is the one place its fields are defined.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# -- how long to fine-tune --------------------------------------------------------------------------
# Preset -> fine-tuning steps. `talkinghead evaluate --snapshots` on the committed small model, T = 8
# (models/MODEL_CARD.md): 40 / 80 / 150 / 400 steps gave SSIM 0.758 / 0.762 / 0.764 / 0.765 and
# identity distance 0.265 / 0.269 / 0.277 / 0.285 (the warp: 0.747, 0.266), so 400 steps ("best"
# until 2026-12-07) bought 0.001 SSIM for 2.5x the time and a face further from its person.
PRESETS: dict[str, int] = {"fast": 40, "balanced": 80, "best": 150}
DEFAULT_PRESET = "balanced"
MAX_STEPS = 2000
# What exporting and loading one generator adds when the worker has measured none yet (its first
# job): the worker writes its generator from a kept template, 0.5-2.2 s measured on 2 CPU cores
# for the small model (it was 20 s when every export traced). After its first job the worker
# writes its own measures into each job (export_estimate_s, and the pace step_estimate_s,
# start_estimate_s that give an estimate before the job's own pace is known).
EXPORT_ESTIMATE_S = 2.0


def steps_for(*, steps: int = 0, preset: str = "") -> int:
    """Explicit steps (1-MAX_STEPS) win; else the preset's (default: DEFAULT_PRESET). ValueError else."""
    if steps:
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be 1-{MAX_STEPS}, got {steps}")
        return steps
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
    return PRESETS[name]


# -- states and kinds -------------------------------------------------------------------------------
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
PERSONALISE = "personalise"  # fine-tune, export, load: the public operation
REMOVE = "remove"  # unload and delete an avatar's generator (after DeleteAvatar): internal
# google.rpc.Code values an ended job reports
CODE_CANCELLED, CODE_NOT_FOUND, CODE_FAILED_PRECONDITION, CODE_INTERNAL, CODE_UNAVAILABLE = 1, 5, 9, 13, 14
CODE_RESOURCE_EXHAUSTED = 8


def cancelled_why(what: str, reason: str) -> str:
    """A cancelled job's error: what it was doing, and why it was cancelled when that is known
    ("cancelled at step 3 of 40: the avatar was deleted")."""
    return f"{what}: {reason}" if reason else what


def new_id() -> str:
    return secrets.token_hex(8)


ID = re.compile(r"[0-9a-f]{16}")  # what new_id makes; fullmatch it ("$" lets a final "\n" through)


@dataclass(kw_only=True)
class Job:
    id: str
    kind: str  # PERSONALISE | REMOVE
    avatar_id: str
    model_id: str = ""  # the base model the avatar was made with (the worker must run the same)
    consent_id: str = ""  # the avatar's consent record id (stamped into the personalised generator)
    avatar_created: float = 0.0  # the avatar record's create_time (stamped too: contract.avatar_stamp)
    steps: int = 0
    state: str = QUEUED
    stage: str = "queued"
    step: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    create_time: float = field(default_factory=time.time)
    start_time: float = 0.0  # the current attempt's start
    first_step_time: float = 0.0  # when step 1 ended (the per-step estimate starts there)
    export_time: float = 0.0  # when the export began (its estimate counts down from there)
    load_time: float = 0.0  # when the exported generator began loading into the Tritons
    end_time: float = 0.0
    attempt: int = 0
    worker: str = ""
    cancel_requested: bool = False
    cancel_reason: str = ""  # why, when the cancel said (the queue's cancel(reason=...)); "" if not
    error_code: int = 0
    error: str = ""
    model_name: str = ""
    model_version: int = 0
    # generator_<avatar>'s latest version when the first attempt began (0: none; -1: not begun): a
    # version above it that a later attempt finds was written by an attempt lost before it said so
    published_before: int = -1
    # the worker's measures from its earlier jobs (0: none yet): export + load, claim -> step 1 ended,
    # and the time per step (what `remaining` uses until this job's own pace is known)
    export_estimate_s: float = 0.0
    start_estimate_s: float = 0.0
    step_estimate_s: float = 0.0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def elapsed(self, now: float | None = None) -> float:
        if not self.start_time:
            return 0.0
        return max(0.0, (self.end_time or (now or time.time())) - self.start_time)

    def remaining(self, now: float | None = None) -> float:
        """Seconds left: steps left at the pace since step 1, plus the export (counting down once
        it began); before step 2, the worker's pace and start-up time from its earlier jobs; 0 when
        unknown (queued, or a worker's first job before its second step), or the export overran
        its estimate."""
        now = now or time.time()
        if self.done:
            return 0.0
        export = self.export_estimate_s or EXPORT_ESTIMATE_S
        if self.export_time:
            return max(0.0, export - (now - self.export_time))
        if self.step >= 2 and self.first_step_time:
            pace = (now - self.first_step_time) / (self.step - 1)
            return pace * (self.steps - self.step) + export
        if self.state != RUNNING or not self.start_time or not self.step_estimate_s:
            return 0.0
        step_one = self.first_step_time or max(now, self.start_time + self.start_estimate_s)
        return max(0.0, step_one + self.step_estimate_s * (self.steps - 1) - now) + export

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        raw: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        job = cls(**{k: v for k, v in raw.items() if k in known})
        job.losses = dict(job.losses or {})
        return job

    def taken(self, worker: str, attempt: int) -> Job:
        """This job, RUNNING now as `worker`'s `attempt` (its step and timings from 0)."""
        self.state, self.worker, self.attempt = RUNNING, worker, attempt
        self.stage = "removing" if self.kind == REMOVE else "fine-tuning"
        self.start_time, self.first_step_time, self.export_time, self.step = time.time(), 0.0, 0.0, 0
        self.load_time, self.losses = 0.0, {}  # (a lost attempt's losses read as this one's step 0)
        return self

    def ended(self, state: str, *, code: int = 0, error: str = "") -> Job:
        """This job, ended now in `state` (SUCCEEDED, FAILED or CANCELLED)."""
        assert state in TERMINAL, state
        self.state, self.stage, self.end_time = state, "done", time.time()
        self.error_code, self.error = code, error
        return self
