# syntax=docker/dockerfile:1
# NVIDIA Triton 24.10 (server 2.51, TensorRT 10.5, CUDA 12.6, Python 3.10) plus what the talkinghead
# model repository needs: ONNX Runtime, OpenVINO and numpy for python-backend models, and the project's
# engine builder (`python3 -m export.to_tensorrt`), which the Helm chart runs in an init container
# on the GPU node itself, because TensorRT plans are specific to the GPU and TensorRT version.
#
#   docker build -f deploy/docker/triton.Dockerfile -t registry.example.com/talkinghead/triton:0.1.0 .
#   docker run --rm --gpus all -p 8000-8002:8000-8002 -v "$PWD/model_repository:/models:ro" \
#       registry.example.com/talkinghead/triton:0.1.0 tritonserver --model-repository=/models
#
# Building needs the NGC registry (nvcr.io) and NVIDIA's Python index (pypi.nvidia.com, where the
# TensorRT library wheels live) besides PyPI.

ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

# The TensorRT Python API used by export.to_tensorrt. It must equal the TensorRT inside the base
# image (24.10: 10.5), or Triton refuses the plans it builds.
ARG TENSORRT_VERSION=10.5.0
ARG NVIDIA_PIP_INDEX=https://pypi.nvidia.com
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="talkinghead-triton" \
      org.opencontainers.image.description="Triton 24.10 with ONNX Runtime and the talkinghead TensorRT engine builder" \
      org.opencontainers.image.version="${VERSION}"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER root
COPY deploy/docker/triton-requirements.txt /tmp/triton-requirements.txt
RUN python3 -m pip install --no-deps --only-binary=:all: -r /tmp/triton-requirements.txt \
    && python3 -m pip install --extra-index-url "${NVIDIA_PIP_INDEX}" "tensorrt-cu12==${TENSORRT_VERSION}" \
    && python3 -c "import numpy, onnxruntime, openvino; print('onnxruntime', onnxruntime.__version__, 'openvino', openvino.__version__)" \
    && rm /tmp/triton-requirements.txt

# The engine builder, importable as `export` from the working directory.
WORKDIR /opt/talkinghead
COPY export/ ./export/
ENV PYTHONPATH=/opt/talkinghead \
    HOME=/tmp

# triton-server (uid 1000) comes with the base image; numeric so that runAsNonRoot can verify it.
USER 1000:1000
EXPOSE 8000 8001 8002
# As the Helm chart runs it: healthy = the shared generator is ready (urlopen raises otherwise), with
# --strict-readiness=false, so that a personalised generator Triton refused (out of memory) does not
# mark the whole server unhealthy for good, even once it is unloaded and removed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/models/generator/ready', timeout=4)"]
# ENTRYPOINT stays the base image's /opt/nvidia/nvidia_entrypoint.sh.
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", \
     "--load-model=embedder", "--load-model=generator", "--strict-readiness=false"]
