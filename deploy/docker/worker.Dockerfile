# syntax=docker/dockerfile:1
# The personalisation worker (`talkinghead worker`): PyTorch, the training and export code, the job
# queue client; never the server. Takes jobs from Redis, fine-tunes on the GPU, writes
# generator_<avatar> into the model repository and loads it in every Triton.
#
#   docker build -f deploy/docker/worker.Dockerfile -t registry.example.com/talkinghead/worker:0.1.0 .
#   docker run --rm --gpus all -v "$PWD/model_repository:/models" \
#       -e TALKINGHEAD_REDIS_URL=redis://redis:6379/0 registry.example.com/talkinghead/worker:0.1.0 \
#       worker --repository /models --triton-url triton:8001
# (it runs as user 10001: the mounted repository must be writable by it, e.g. group 10001 with
# g+ws as deploy/README.md section 3 sets the claim up, or add --user with your own uid)
#
# Build from the repository root (the context); .dockerignore keeps data, runs and .venv out.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: torch with its CUDA libraries, everything else exactly as requirements/lock.txt -----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
COPY requirements/lock.txt /tmp/lock.txt
# The lock's development tools and what only they need (tests/test_helm.py checks that every
# package left is needed by nothing here or by something kept).
ARG DEVELOPMENT_ONLY="torch|ruff|mypy|mypy_extensions|pytest|pytest-xdist|execnet|pluggy|iniconfig|pathspec|librt|ast_serialize|hypothesis|sortedcontainers|kubernetes-validate|jsonschema|jsonschema-specifications|referencing|rpds-py|attrs|importlib_resources|grpcio-tools|face_alignment"
# PyPI's Linux torch wheel of the lock's version is the CUDA 12 build: installed with its
# dependencies (the nvidia-* libraries). The lock pins the CPU build (2.13.0+cpu, a local version
# PyPI does not carry): the public part is asked for. The rest without resolution, minus
# development tools.
RUN /opt/venv/bin/pip install "torch==$(sed -n 's/^torch==\([^+]*\).*/\1/p' /tmp/lock.txt)" \
    && grep -v -E "^($DEVELOPMENT_ONLY)==" \
        /tmp/lock.txt > /tmp/worker-lock.txt \
    && /opt/venv/bin/pip install --no-deps --only-binary=:all: --no-binary=face-recognition-models \
        -r /tmp/worker-lock.txt

# ---- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="talkinghead-worker" \
      org.opencontainers.image.description="Fine-tunes talking-head avatars and publishes their generators" \
      org.opencontainers.image.version="${VERSION}"
RUN groupadd --system --gid 10001 talkinghead \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin talkinghead
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The worker's code: the job records (jobs/), training, export and the shared toolkit, the CLI, and
# the committed meta checkpoint (the served model's; mount another and pass --checkpoint).
COPY pyproject.toml ./
COPY facekit/ ./facekit/
COPY talkinghead/ ./talkinghead/
COPY jobs/ ./jobs/
COPY worker/ ./worker/
COPY training/ ./training/
COPY export/ ./export/
COPY models/talkinghead-small.pt ./models/talkinghead-small.pt
RUN printf '#!/bin/sh\nexec /opt/venv/bin/python -m talkinghead.cli "$@"\n' > /usr/local/bin/talkinghead \
    && chmod 0755 /usr/local/bin/talkinghead \
    && /opt/venv/bin/python -m compileall -q /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TALKINGHEAD_MODEL_REPOSITORY=/models \
    TALKINGHEAD_WORKER_CHECKPOINT=/app/models/talkinghead-small.pt

USER 10001:10001
ENTRYPOINT ["talkinghead"]
CMD ["worker"]
