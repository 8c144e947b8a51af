"""Run the gRPC service: avatars, animation streams, health, reflection and Prometheus metrics.

Settings come from TALKINGHEAD_* environment variables (service/README.md lists them); flags
override them. TALKINGHEAD_WATERMARK_KEY is the secret every generated frame is marked with
(without it frames go out unmarked and a warning says so; --production refuses to start). With no
flags it serves model_repository/ in-process with ONNX Runtime on 127.0.0.1:50051, metrics on
:8080. SIGTERM/SIGINT finish running streams (--shutdown-grace s).

example:
  talkinghead serve
  TALKINGHEAD_BACKEND=triton TALKINGHEAD_TRITON_URL=triton:8001 talkinghead serve --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import cv2

from facekit.watermark import MissingKeyError
from service import settings as settings_module
from service.server import serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_module.from_args(args)
    except ValueError as error:
        raise SystemExit(f"talkinghead serve: {error}") from error
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # OpenCV's own thread pool splits each small warp, mark and encode over the cores and back: with
    # it the server spent 1.75-1.82 ms of CPU per frame at the bench's serving ceiling, without it
    # 1.56-1.59, at the same frames/s; its workers only took cores from the generator's lanes.
    cv2.setNumThreads(1)
    try:
        asyncio.run(serve(settings))
    except MissingKeyError as error:
        raise SystemExit(f"talkinghead serve: {error}") from error
    return 0
