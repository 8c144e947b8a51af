# syntax=docker/dockerfile:1
# The talkinghead gRPC service: serving dependencies only (no torch, no training code), non-root,
# read-only-root friendly (writes only to /tmp and the avatar store), health-checked over gRPC.
#
#   docker build -f deploy/docker/service.Dockerfile -t registry.example.com/talkinghead/service:0.1.0 .
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:8080:8080 -v "$PWD/model_repository:/models:ro" \
#       -e TALKINGHEAD_BACKEND=onnxruntime -e TALKINGHEAD_ALLOW_UNAUTHENTICATED=1 \
#       registry.example.com/talkinghead/service:0.1.0
# (it listens on 0.0.0.0 inside the container, so it refuses to start without authentication:
# here the ports are published on the host's loopback only; see deploy/README.md for keys and TLS)
#
# Build from the repository root (the context); .dockerignore keeps data, runs and .venv out.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the pinned serving dependencies --------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
# Exact pins equal to requirements/lock.txt (tests/test_helm.py checks), installed without
# resolution so nothing unpinned (torch above all) can sneak in. Wheels only, except
# face_recognition_models, which PyPI has as an sdist alone (pure Python plus dlib's model files).
COPY deploy/docker/serve-requirements.txt /tmp/serve-requirements.txt
RUN /opt/venv/bin/pip install --no-deps --only-binary=:all: --no-binary=face-recognition-models \
        -r /tmp/serve-requirements.txt \
    && /opt/venv/bin/pip check \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# ---- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="talkinghead-service" \
      org.opencontainers.image.description="Few-shot talking-head avatars streamed over gRPC" \
      org.opencontainers.image.version="${VERSION}"

RUN groupadd --system --gid 10001 talkinghead \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin talkinghead \
    && mkdir -p /var/lib/talkinghead/avatars /models \
    && chown 10001:10001 /var/lib/talkinghead/avatars

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Only what serving imports: the shared landmark toolkit, the server, the job records it shares with
# the worker (jobs/; the worker itself is deploy/docker/worker.Dockerfile), its protocol (the .proto
# sources and the generated api/ stubs), the CLI, and the client commands (`talkinghead avatar`,
# `animate`, `operation`, `verify` inside the pod; torch-free like the server; not `bench`, whose
# serving ceiling needs onnx and whose personalisation row a worker).
COPY pyproject.toml ./
COPY facekit/ ./facekit/
COPY talkinghead/ ./talkinghead/
COPY api/ ./api/
COPY service/ ./service/
COPY jobs/ ./jobs/
COPY client/ ./client/
COPY proto/ ./proto/
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/talkinghead-healthcheck
# `talkinghead` runs the CLI from /app (the sources above; no editable install, no build step).
RUN printf '#!/bin/sh\nexec /opt/venv/bin/python -m talkinghead.cli "$@"\n' > /usr/local/bin/talkinghead \
    && chmod 0755 /usr/local/bin/talkinghead \
    && /opt/venv/bin/python -m compileall -q /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba \
    TALKINGHEAD_HOST=0.0.0.0 \
    TALKINGHEAD_GRPC_PORT=50051 \
    TALKINGHEAD_METRICS_PORT=8080 \
    TALKINGHEAD_AVATAR_STORE=/var/lib/talkinghead/avatars \
    TALKINGHEAD_JOBS=/var/lib/talkinghead/avatars/.jobs \
    TALKINGHEAD_WATERMARK_KEY_FILE=/var/lib/talkinghead/avatars/.watermark.key \
    TALKINGHEAD_AUDIT_LOG=/var/lib/talkinghead/avatars/audit.jsonl \
    HOME=/tmp \
    TALKINGHEAD_WORKER=none \
    TALKINGHEAD_MODEL_REPOSITORY=/models

USER 10001:10001
EXPOSE 50051 8080
VOLUME ["/var/lib/talkinghead/avatars"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["talkinghead-healthcheck"]
ENTRYPOINT ["talkinghead"]
CMD ["serve"]
