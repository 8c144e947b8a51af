"""Run the gRPC service: avatars, animation streams, health, reflection and Prometheus metrics.

Settings come from TALKINGHEAD_* environment variables (service/README.md lists them); flags
override them. TALKINGHEAD_WATERMARK_KEY is the secret every generated frame is marked with;
without it the key in var/watermark.key (made there once; --watermark-key-file) marks them, and
--production refuses to start. With no flags it serves model_repository/ in-process with ONNX
Runtime on 127.0.0.1:50051, metrics on :8080. SIGTERM/SIGINT finish running streams
(--shutdown-grace s).

A setting's NAME in the messages is TALKINGHEAD_NAME in the environment and --name as a flag
(API_KEYS: TALKINGHEAD_API_KEYS, --api-keys).

examples:
  talkinghead serve                                   # 127.0.0.1:50051, no authentication (loopback)
  talkinghead keys --keys var/keys.json issue --tenant acme          # an API key for the next one
  TALKINGHEAD_BACKEND=triton TALKINGHEAD_TRITON_URL=triton:8001 talkinghead serve --host 0.0.0.0 \\
      --api-keys var/keys.json --tls-cert tls.crt --tls-key tls.key   # exposed: keys, over TLS
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import cv2

from facekit import logs, scheduling
from facekit.watermark import MissingKeyError
from service import settings as settings_module
from service.server import BindError, serve

log = logging.getLogger("talkinghead.service")


def set_cpu_scheduling(policy: str) -> None:
    """Every thread of this process, and every thread and process it starts later (they inherit
    it), under Linux's SCHED_BATCH ("batch") or SCHED_OTHER ("normal").

    With in-process inference the engine's threads and the service's share the cores, and the
    service wakes hundreds of times a second (a frame read, a batch back, a reply written), each
    wake-up preempting an inference thread. A SCHED_BATCH thread that wakes does not preempt: it
    runs at the scheduler's next tick (1-4 ms), having gathered more to do. Paired bench rounds on
    the 2-core VM: the service's CPU per frame 1.41-1.56 -> 1.20-1.30 ms, live + offline ratio
    0.872-0.897 -> 0.896-0.931 (see BENCHMARKS.md). Its share of the CPU is unchanged, and on idle
    cores (a Triton backend on another machine) a wake-up runs at once either way. Unprivileged: lowering a
    thread's claim needs no capability; where it is refused (a seccomp profile) a warning says so."""
    threads = scheduling.set_process_policy(policy)
    if threads is None:
        log.warning("cannot set the CPU scheduling policy to %s (refused here)", policy)
        return
    log.info("CPU scheduling: %s (%d thread(s))", policy, threads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_module.from_args(args)
    except ValueError as error:
        hint = " (a NAME here is TALKINGHEAD_NAME or --name: `talkinghead serve --help`)"
        raise SystemExit(
            f"talkinghead serve: {error}{hint if 'invalid settings' in str(error) else ''}"
        ) from error
    logs.configure(settings.log_level, settings.log_format)  # text, or JSON lines (facekit/logs.py)
    # OpenCV's own thread pool splits each small warp, mark and encode over the cores and back: with
    # it the server spent 1.75-1.82 ms of CPU per frame at the bench's serving ceiling, without it
    # 1.56-1.59, at the same frames/s; its workers only took cores from the generator's lanes.
    cv2.setNumThreads(1)
    set_cpu_scheduling(settings.cpu_scheduling)
    try:
        asyncio.run(serve(settings))
    except (MissingKeyError, BindError) as error:
        logging.shutdown()  # the lines logged before it first (the log writer waits up to 50 ms)
        raise SystemExit(f"talkinghead serve: {error}") from error
    return 0
